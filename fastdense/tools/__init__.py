"""The tools behind ``python -m fastdense``: the main job's report, the benchmark and profiling suite,
the kernel microbenchmarks and the numerical comparison against torchvision they share.

Nothing here is imported by ``import fastdense``: the library stays free of argparse, rich and matplotlib
work, and each subcommand imports only its own modules.
"""

from __future__ import annotations

import difflib
import importlib
import sys

# Subcommand -> the module whose ``main(argv)`` runs it, and what it does; no subcommand runs the report.
SUBCOMMANDS = {
    "bench": ("bench", "speed, peak memory and accuracy of each provider against torchvision eager"),
    "fit": ("fit", "the largest batch or volume each provider trains in on a card's memory (counted)"),
    "traffic": ("traffic", "launches, bytes, FLOPs and roofline floor of one step, counted on fake tensors"),
    "host": ("host", "the host (CPU) time a step takes to issue its work, measured without a GPU"),
    "volumes": ("volumes", "the 3-D benchmark: MONAI's DenseNet on volumes against its conversion"),
    "profile": ("profile", "a per-operator and per-kernel profile of a few steps"),
    "kernels": ("kernel_bench", "the Triton kernels against torchvision's operators (GB/s, TFLOP/s)"),
}
DEFAULT = "report"


def subcommands_help() -> str:
    """The subcommands, a line each, for the report's ``--help``."""
    lines = [f"  {name:9} {summary}" for name, (_, summary) in SUBCOMMANDS.items()]
    return "subcommands (python -m fastdense SUBCOMMAND --help for each one's options):\n" + "\n".join(lines)


def describe(doc: str) -> str:
    """A tool's ``--help`` description: its module docstring's first paragraph, whole."""
    return " ".join(doc.strip().split("\n\n")[0].split())


def main(argv: list[str] | None = None) -> None:
    """Dispatch ``python -m fastdense [subcommand] [options]`` (also the ``fastdense`` console script)."""
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in SUBCOMMANDS:
        module, argv = SUBCOMMANDS[argv[0]][0], argv[1:]
    elif argv and not argv[0].startswith("-"):  # a word where a subcommand goes: not one of the report's options
        close = difflib.get_close_matches(argv[0], SUBCOMMANDS, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        print(f"python -m fastdense: unknown subcommand {argv[0]!r}{hint}\n{subcommands_help()}", file=sys.stderr)
        raise SystemExit(2)
    else:
        module = DEFAULT
    importlib.import_module(f"{__name__}.{module}").main(argv)
