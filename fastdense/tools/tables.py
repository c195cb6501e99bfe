"""Tables and progress for the command-line tools: rich when it is installed, plain text otherwise
(the GPU machine has no rich, and nothing can be installed there)."""

from __future__ import annotations

import sys
from contextlib import contextmanager

try:
    import rich  # noqa: F401

    HAVE_RICH = True
except ImportError:
    HAVE_RICH = False


def format_table(headers: list[str], rows: list[list[str]], text_columns: int) -> str:
    """A plain-text table: the first ``text_columns`` columns left-aligned, the figures right-aligned."""
    widths = [max(len(cell) for cell in column) for column in zip(headers, *rows, strict=True)]

    def line(cells: list[str]) -> str:
        return "  ".join(
            cell.ljust(width) if i < text_columns else cell.rjust(width)
            for i, (cell, width) in enumerate(zip(cells, widths, strict=True))
        )

    return "\n".join([line(headers), "-" * (sum(widths) + 2 * (len(widths) - 1)), *map(line, rows)])


def print_table(title: str, headers: list[str], rows: list[list[str]], text_columns: int) -> None:
    if not HAVE_RICH:
        print(f"\n{title}\n{format_table(headers, rows, text_columns)}")
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title, title_justify="left")
    for i, header in enumerate(headers):
        table.add_column(header, justify="left" if i < text_columns else "right", overflow="fold")
    for row in rows:
        table.add_row(*row)
    Console(width=200).print(table)


@contextmanager
def progress(total: int, enabled: bool = True):
    """Yields ``step(description)``, called before each of ``total`` steps: a progress bar with rich,
    a line on stderr without it."""
    if HAVE_RICH and enabled:
        from rich.progress import Progress

        with Progress(transient=True) as bar:
            task = bar.add_task("", total=total)
            started = False

            def step(description: str) -> None:
                nonlocal started
                if started:
                    bar.advance(task)
                started = True
                bar.update(task, description=description)

            yield step
        return
    count = 0

    def step(description: str) -> None:
        nonlocal count
        count += 1
        if enabled:
            print(f"  [{count}/{total}] {description}", file=sys.stderr, flush=True)

    yield step
