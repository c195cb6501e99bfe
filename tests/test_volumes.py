"""``python -m fastdense volumes``: the 3-D benchmark's providers and its output (sizes too small to time)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

import fastdense
from fastdense.tools import volumes


def test_the_fastdense_providers_are_the_converted_monai_model():
    monai_keys = volumes.build("monai-eager", "monai-densenet121-3d", torch.device("cpu")).state_dict().keys()
    for provider, efficient in (("fastdense", False), ("fastdense-memory-efficient", True)):
        net = volumes.build(provider, "monai-densenet121-3d", torch.device("cpu"))
        blocks = [m for m in net.modules() if isinstance(m, fastdense.FastDenseBlock)]
        assert len(blocks) == 4 and all(b.memory_efficient == efficient for b in blocks)
        assert net.state_dict().keys() == monai_keys


def test_the_command_measures_every_provider_and_volume(tmp_path, capsys):
    out, png = tmp_path / "volumes.json", tmp_path / "volumes.png"
    args = ["--volumes", "32", "--batch", "2", "--repeats", "1", "--providers", "fastdense", "--device", "cpu"]
    volumes.main([*args, "--json", str(out), "--plot", str(png)])
    rows = json.loads(out.read_text())
    assert [r["provider"] for r in rows] == ["monai-eager", "fastdense"]  # the baseline is always measured
    assert all(r["peak_mem_mb"] > 0 and r["ms_median"] > 0 and len(r["seconds"]) == 1 for r in rows)
    printed = capsys.readouterr().out
    assert "monai-densenet121-3d, batch 2" in printed and "fastdense" in printed
    assert png.stat().st_size > 0


def test_the_readmes_3d_snippet_runs():
    """The README's "3-D volumes" code, as printed: MONAI's DenseNet121 converted, memory_efficient set."""
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme.split("### 3-D volumes (CT, MRI): MONAI", 1)[1]
    code = section.split("```python\n", 1)[1].split("```", 1)[0]
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)
    blocks = [m for m in namespace["model"].modules() if isinstance(m, fastdense.FastDenseBlock)]
    assert len(blocks) == 4 and all(b.memory_efficient and b.spatial_dims == 3 for b in blocks)
