"""Every code block of the README and of docs/ runs as printed, so the documentation cannot drift.

Python blocks run whole, each in a fresh namespace in an empty folder (some have more checks on what
they leave behind). Shell blocks are checked without running what would take minutes or a GPU (the main
job, the test suite itself, the GPU check): each ``python -m fastdense TOOL ...`` line's arguments are
parsed by that tool's own parser, each script or example named exists and its options parse, and the
set-up commands name ``scripts/dev.sh``'s two entry points.
"""

from __future__ import annotations

import argparse
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

import fastdense

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^( *)```(\w*)\n(.*?)^\1```", re.M | re.S)


def blocks(language: str) -> list:
    found = []
    for path in DOCS:
        for i, match in enumerate(FENCE.finditer(path.read_text())):
            indent, lang, body = match.groups()
            if (lang or "shell") == language:
                code = "\n".join(line[len(indent) :] for line in body.splitlines())
                found.append(pytest.param(code, id=f"{path.relative_to(ROOT)}-{i}"))
    return found


def _check_deployment(namespace: dict) -> None:
    from fastdense.tools.verify import relative_error

    x, model, scripted = namespace["x"], namespace["model"], namespace["scripted"]
    assert relative_error(scripted(x), model(x)) <= 1e-4
    assert set(namespace["maps"]) == {"c3", "c4"} and set(namespace["scripted_body"](x)) == {"c5"}
    assert Path("densenet121.onnx").stat().st_size > 1e6
    assert not any(isinstance(m, fastdense.FastDenseBlock) for m in namespace["original"].modules())


def _check_volumes(namespace: dict) -> None:
    blocks = [m for m in namespace["model"].modules() if isinstance(m, fastdense.FastDenseBlock)]
    assert len(blocks) == 4 and all(b.memory_efficient and b.spatial_dims == 3 for b in blocks)


CHECKS = {"torch.onnx.export": _check_deployment, "block.memory_efficient = True": _check_volumes}


@pytest.mark.parametrize("code", blocks("python"))
def test_python_blocks_run_as_printed(code, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "__docs__"}
    exec(compile(code, "docs", "exec"), namespace)
    for marker, check in CHECKS.items():
        if marker in code:
            check(namespace)


class _Parsed(Exception):
    """Raised instead of running a tool once its arguments parsed."""


def _parse_only(monkeypatch):
    original = argparse.ArgumentParser.parse_args

    def parse_args(self, args=None, namespace=None):
        original(self, args, namespace)  # exits with status 2 on a bad argument
        raise _Parsed

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_args)


def _commands(code: str) -> list[list[str]]:
    joined = code.replace("\\\n", " ")
    return [shlex.split(line, comments=True) for line in joined.splitlines() if shlex.split(line, comments=True)]


@pytest.mark.parametrize("code", blocks("shell"))
def test_shell_blocks_name_real_commands_with_arguments_that_parse(code, monkeypatch):
    from fastdense.tools import main as fastdense_main

    _parse_only(monkeypatch)
    for words in _commands(code):
        if words[0].endswith("python") and words[1:3] == ["-m", "fastdense"]:
            with pytest.raises(_Parsed):
                fastdense_main(words[3:])
        elif words[0].endswith("python") and words[1:3] == ["-m", "pytest"]:
            assert all((ROOT / w).exists() for w in words[3:] if not w.startswith("-")), words
        elif words[0] == "scripts/dev.sh":
            assert words[1] in ("report", "test"), words
        elif words[0] == "torchrun":
            script = next(w for w in words[1:] if w.endswith(".py"))
            options = words[words.index(script) + 1 :]
            done = subprocess.run([sys.executable, str(ROOT / script), *options, "--help"], capture_output=True)
            assert done.returncode == 0, done.stderr
        else:
            assert (ROOT / words[0]).is_file(), words  # a script of the repository
            done = subprocess.run(["bash", "-n", str(ROOT / words[0])], capture_output=True)
            assert done.returncode == 0, done.stderr


def test_every_document_is_linked_and_the_readme_fits_about_two_screens():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 110
    for page in (ROOT / "docs").glob("*.md"):
        assert f"docs/{page.name}" in readme, page.name
    for path in DOCS:  # relative links point at files that exist, inside the repository (a clone has no more)
        for target in re.findall(r"\]\(([^)#:]+)\)", path.read_text()):
            assert (path.parent / target).exists(), (path.name, target)
            assert (path.parent / target).resolve().is_relative_to(ROOT), (path.name, target)


def test_no_document_or_source_cites_a_file_outside_the_repository():
    """The design lives in docs/design.md; nothing cites the design notes or folders a clone does not have."""
    sources = [
        *DOCS,
        *(ROOT / "fastdense").rglob("*.py"),
        *(ROOT / "kernels").glob("*.py"),
        *(ROOT / "examples").glob("*.py"),
    ]
    for path in sources:
        text = path.read_text()
        assert "DESIGN.md" not in text and "../shared" not in text, path
