#!/usr/bin/env bash
# The GPU machine's one prepared run (README: "The GPU check"): correctness first, then the headline
# comparison, then the rest, each stage under `timeout -k` within a 480 s budget. OUTDIR gets summary.txt
# and results.tar.gz (every log and JSON), refreshed after every stage; caches and scratch stay in /tmp.
#
#   benchmarks/gpu_check.sh [--rehearse] [--budget SECONDS] OUTDIR
#
# --rehearse: the same plumbing on the CPU with tiny stand-ins (CI runs it: tests/test_gpu_check.py).
# Runs from the source tree (PYTHONPATH=.) with the machine's own torch/triton/torchvision; installs
# nothing. A MONAI wheel put in .gpu-extras/ (benchmarks/fetch_gpu_extras.sh) travels with the tree and
# is put on the path when the machine has no monai. Record what it prints in benchmarks/RESULTS.md.
set -uo pipefail

usage() {
    echo "usage: benchmarks/gpu_check.sh [--rehearse] [--budget SECONDS] OUTDIR" >&2
    exit 2
}

options=()
out=""
while [ $# -gt 0 ]; do
    case "$1" in
        --rehearse) options+=(--rehearse); shift ;;
        --budget)
            [[ $# -ge 2 && "$2" =~ ^[0-9]+$ ]] || usage
            options+=(--budget "$2"); shift 2 ;;
        -h|--help) usage ;;
        -*) echo "gpu_check.sh: unknown option $1" >&2; usage ;;
        *) [ -z "$out" ] || usage; out="$1"; shift ;;
    esac
done
[ -n "$out" ] || usage
if ! mkdir -p -- "$out" 2>/dev/null || ! out="$(cd -- "$out" && pwd)"; then
    echo "gpu_check.sh: cannot create or enter OUTDIR $out" >&2
    exit 2
fi

cd "$(dirname "$0")/.." || exit 2
python="${PYTHON:-python}"
export PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}"
if ! "$python" -c "import monai" 2>/dev/null; then
    for wheel in .gpu-extras/monai-*.whl; do  # pure Python: importable from the zip file itself
        [ -f "$wheel" ] && export PYTHONPATH="$PYTHONPATH:$PWD/$wheel"
    done
fi
exec "$python" benchmarks/gpu_check.py "${options[@]}" "$out"
