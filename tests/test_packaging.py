"""Installing fastdense adds one top-level import name, ``fastdense``: the repository's ``kernels/`` folder
installs as ``fastdense.kernels`` (a top-level ``kernels`` would overwrite, or be overwritten by, the
kernel-hub client of that name), and imports as that from the source tree too (``PYTHONPATH=.``)."""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_a_wheel_from_a_clean_clone_holds_only_fastdense(tmp_path):
    if not (ROOT / ".git").exists() or shutil.which("git") is None:
        pytest.skip("needs the git checkout to clone")
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "--quiet", str(ROOT), str(clone)], check=True)
    # Build what is checked out here, committed or not: the tracked files as they are in the working tree.
    tracked = subprocess.run(["git", "-C", str(ROOT), "ls-files"], capture_output=True, text=True, check=True)
    for name in tracked.stdout.splitlines():
        if (ROOT / name).is_file():
            (clone / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(ROOT / name, clone / name)
    command = [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation", "-w",
               str(tmp_path / "dist"), str(clone)]  # fmt: skip
    subprocess.run(command, check=True, capture_output=True, text=True)
    (wheel,) = (tmp_path / "dist").glob("fastdense-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert {name.split("/")[0] for name in names} == {"fastdense", wheel.name.split("-py3")[0] + ".dist-info"}
    top_level = next(n for n in names if n.endswith("top_level.txt"))
    assert zipfile.ZipFile(wheel).read(top_level).decode().split() == ["fastdense"]
    kernels = sorted(p.name for p in (ROOT / "kernels").glob("*.py"))
    assert sorted(n.split("/")[-1] for n in names if n.startswith("fastdense/kernels/")) == kernels


def test_the_kernels_import_as_fastdense_kernels_from_the_source_tree():
    import fastdense.kernels.launch

    assert Path(fastdense.kernels.launch.__file__) == ROOT / "kernels" / "launch.py"
    # The source tree's stand-in (replaced by kernels/ itself in a wheel) points at that folder.
    spec = importlib.util.spec_from_file_location("stand_in", ROOT / "fastdense" / "kernels" / "__init__.py")
    stand_in = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(stand_in)
    assert [Path(p) for p in stand_in.__path__] == [ROOT / "kernels"]


def test_the_build_system_table_is_declared():
    import tomllib

    table = tomllib.loads((ROOT / "pyproject.toml").read_text())["build-system"]
    assert table["build-backend"] == "setuptools.build_meta" and any("setuptools" in r for r in table["requires"])
