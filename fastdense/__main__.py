"""``python -m fastdense [report options]``: the verification-and-benchmark report (``fastdense.report``).

``python -m fastdense bench ...``: the benchmark suite (``fastdense.bench``).
``python -m fastdense profile ...``: per-kernel profile of a few steps (``fastdense.profile``).
``python -m fastdense kernels ...``: Triton kernels against torchvision's ops (``fastdense.kernel_bench``).
"""

import sys


def main() -> None:
    command = sys.argv[1] if len(sys.argv) > 1 else None
    if command == "bench":
        from .bench import main as run
    elif command == "profile":
        from .profile import main as run
    elif command == "kernels":
        from .kernel_bench import main as run
    else:
        from .report import main as run

        run(sys.argv[1:])
        return
    run(sys.argv[2:])


main()
