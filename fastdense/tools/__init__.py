"""The tools behind ``python -m fastdense``: the main job's report, the benchmark and profiling suite,
the kernel microbenchmarks and the numerical comparison against torchvision they share.

Nothing here is imported by ``import fastdense``: the library stays free of argparse, rich and matplotlib
work, and each subcommand imports only its own modules.
"""

from __future__ import annotations

import importlib
import sys

# Subcommand -> the module whose ``main(argv)`` runs it; no subcommand runs the report.
SUBCOMMANDS = {
    "bench": "bench", "profile": "profile", "kernels": "kernel_bench", "traffic": "traffic", "volumes": "volumes",
    "fit": "fit", "host": "host",
}  # fmt: skip
DEFAULT = "report"


def main(argv: list[str] | None = None) -> None:
    """Dispatch ``python -m fastdense [subcommand] [options]`` (also the ``fastdense`` console script)."""
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in SUBCOMMANDS:
        module, argv = SUBCOMMANDS[argv[0]], argv[1:]
    else:
        module = DEFAULT
    importlib.import_module(f"{__name__}.{module}").main(argv)
