#!/usr/bin/env bash
# What the GPU machine lacks and cannot install (it has no registry): MONAI's pure-Python wheel, for the
# GPU check's 3-D stage. Downloads it into .gpu-extras/ (ignored by git); give the device tool
# `carry: [".gpu-extras"]` and benchmarks/gpu_check.sh puts the wheel on the path there (zipimport).
set -euo pipefail
cd "$(dirname "$0")/.."
version="$(sed -n 's/^monai==\([0-9.]*\).*/\1/p' requirements.txt)"
mkdir -p .gpu-extras
"${PYTHON:-python3}" -m pip download --quiet --disable-pip-version-check --no-deps "monai==${version}" -d .gpu-extras
ls -l .gpu-extras
