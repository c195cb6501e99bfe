"""``python -m fastdense``: the command-line tools in ``fastdense.tools``.

``python -m fastdense [report options]``: the verification-and-benchmark report (``fastdense.tools.report``).
``python -m fastdense bench ...``: the benchmark suite (``fastdense.tools.bench``).
``python -m fastdense profile ...``: per-kernel profile of a few steps (``fastdense.tools.profile``).
``python -m fastdense kernels ...``: Triton kernels against torchvision's ops (``fastdense.tools.kernel_bench``).
``python -m fastdense traffic ...``: operators and bytes of one step, counted (``fastdense.tools.traffic``).
"""

import sys

from .tools import main

main(sys.argv[1:])
