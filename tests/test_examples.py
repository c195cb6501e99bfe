"""The examples users copy run, as processes, on a few generated images and volumes: so they cannot rot.
The DDP path of the classifier runs under torchrun with two gloo processes."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"


def _run(*args, cwd: Path, timeout: int = 300) -> str:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"} | {"OMP_NUM_THREADS": "1"}
    done = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory) -> Path:
    """A tiny ImageFolder data set: two classes of generated 40x40 PNGs, train/ and val/."""
    from PIL import Image

    root = tmp_path_factory.mktemp("images")
    generator = torch.Generator().manual_seed(0)
    for split, count in (("train", 8), ("val", 4)):
        for label in ("cat", "dog"):
            folder = root / split / label
            folder.mkdir(parents=True)
            for i in range(count):
                pixels = (torch.rand(40, 40, 3, generator=generator) * 255).to(torch.uint8)
                Image.fromarray(pixels.numpy()).save(folder / f"{i}.png")
    return root


COMMON = ["--epochs", "2", "--batch-size", "4", "--image-size", "32", "--workers", "0", "--lr", "0.01"]


@pytest.mark.parametrize("convert", [None, "torchvision", "timm"])
def test_train_classifier_trains_checkpoints_and_resumes(image_folder, tmp_path, convert):
    checkpoint = tmp_path / "ckpt.pt"
    extra = ["--convert", convert] if convert else []
    script = str(EXAMPLES / "train_classifier.py")
    out = _run(sys.executable, script, "--data", str(image_folder), "--checkpoint", str(checkpoint), *COMMON,
               *extra, cwd=tmp_path)  # fmt: skip
    assert "epoch 0:" in out and "epoch 1:" in out and "img/s" in out and "peak resident memory" in out
    state = torch.load(checkpoint)
    assert state["epoch"] == 1
    if convert != "timm":
        assert "loads into torchvision.models.densenet121" in out
    # resume: one more epoch from the checkpoint, fp16 with a gradient scaler this time
    resumed = [*COMMON[2:], "--epochs", "3", "--amp", "fp16", "--resume", *extra]
    out = _run(sys.executable, script, "--data", str(image_folder), "--checkpoint", str(checkpoint), *resumed,
               cwd=tmp_path)  # fmt: skip
    assert "epoch 0:" not in out and "epoch 2:" in out and torch.load(checkpoint)["epoch"] == 2


def test_train_classifier_under_torchrun_with_two_processes(image_folder, tmp_path):
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or shutil.which("torchrun")
    checkpoint = tmp_path / "ddp.pt"
    out = _run(torchrun, "--standalone", "--nproc_per_node=2", str(EXAMPLES / "train_classifier.py"),
               "--data", str(image_folder), "--checkpoint", str(checkpoint), *COMMON, cwd=tmp_path)  # fmt: skip
    assert out.count("epoch 1:") == 1  # rank 0 reports
    assert torch.load(checkpoint)["epoch"] == 1


def test_monai_3d_trains_compares_memory_and_saves_torchscript(tmp_path):
    out = _run(sys.executable, str(EXAMPLES / "monai_3d.py"), "--volume", "64", "--steps", "2", "--out",
               str(tmp_path / "model.pt"), cwd=tmp_path)  # fmt: skip
    assert "step 1: loss" in out and "peak memory (counted)" in out
    assert "largest difference to eager 0.00e+00" in out
    loaded = torch.jit.load(str(tmp_path / "model.pt"))
    assert loaded(torch.randn(2, 1, 64, 64, 64)).shape == (2, 2)


def test_export_writes_onnx_checks_it_and_exports(image_folder, tmp_path):
    checkpoint = tmp_path / "ckpt.pt"
    _run(sys.executable, str(EXAMPLES / "train_classifier.py"), "--data", str(image_folder), "--checkpoint",
         str(checkpoint), *COMMON[2:], "--epochs", "1", cwd=tmp_path)  # fmt: skip
    out = _run(sys.executable, str(EXAMPLES / "export.py"), "--checkpoint", str(checkpoint), "--num-classes", "2",
               "--image-size", "64", "--out", str(tmp_path / "m.onnx"), cwd=tmp_path)  # fmt: skip
    assert "onnxruntime's output differs from eager by at most" in out and (tmp_path / "m.onnx").stat().st_size
    assert "all core ATen" in out and "c5 (1, 1024, 2, 2)" in out


def test_monai_3d_refuses_a_volume_its_model_gives_nan_at(tmp_path):
    """At 32^3 the last block sees one voxel a sample and MONAI's own model (so the converted one) gives
    NaN in eval after training: the example fails saying so, not "largest difference nan"."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"} | {"OMP_NUM_THREADS": "1"}
    command = [sys.executable, str(EXAMPLES / "monai_3d.py"), "--volume", "32", "--steps", "3", "--out", "m.pt"]
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode != 0 and "use --volume 64 or more" in done.stderr, done.stdout + done.stderr
