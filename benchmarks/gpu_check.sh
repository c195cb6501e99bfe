#!/usr/bin/env bash
# The GPU machine's one prepared run (see the README): correctness on the GPU first, then the benchmark
# at the sizes that matter, a short table last. Everything it measures lands in OUTDIR.
#
#   benchmarks/gpu_check.sh OUTDIR
#
# Runs from the source tree (PYTHONPATH=.) with the machine's own torch/triton/torchvision; installs
# nothing. Budget: 8 minutes on an H100. Each stage has a time limit and the stages run in order of
# importance; a stage cut at its limit keeps the rows it measured (the JSON is rewritten after every
# measurement), and later stages are skipped once the budget is spent. Record what it prints in
# benchmarks/RESULTS.md with the card, date, versions and this command.
set -uo pipefail
out="${1:?usage: benchmarks/gpu_check.sh OUTDIR}"
mkdir -p "$out"
out="$(cd "$out" && pwd)"
cd "$(dirname "$0")/.."
export PYTHONPATH=.
export TORCHINDUCTOR_CACHE_DIR="$out/inductor-cache"  # compiled kernels shared by the measuring processes
budget=470
status=0

stage() {  # stage NAME SECONDS COMMAND...: run under a time limit, log to OUTDIR/NAME.log
    local name="$1" limit="$2"
    shift 2
    local left=$((budget - SECONDS))
    if [ "$left" -lt 20 ]; then
        echo "== $name: SKIPPED, the ${budget}s budget is spent"
        status=1
        return 0
    fi
    [ "$limit" -gt "$left" ] && limit=$left
    echo "== $name (limit ${limit}s): $*"
    local start=$SECONDS
    timeout "$limit" "$@" > "$out/$name.log" 2>&1
    local rc=$?
    echo "   rc=$rc after $((SECONDS - start))s, log $out/$name.log$([ "$rc" -eq 124 ] && echo ': CUT at its time limit')"
    [ "$rc" -ne 0 ] && status=1
    return 0
}

python - <<'PY' | tee "$out/environment.txt"
import datetime, platform, torch, torchvision
try:
    import triton
    triton_version = triton.__version__
except ImportError:
    triton_version = None
gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "NO CUDA DEVICE"
print(f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, {gpu}")
print(f"python {platform.python_version()}, torch {torch.__version__}, torchvision {torchvision.__version__}, "
      f"triton {triton_version}")
PY

bench() {  # the command line of one benchmark stage: NAME MODEL BATCHES PROVIDERS...
    local name="$1" model="$2" batches="$3"
    shift 3
    # shellcheck disable=SC2086  # batches is a list on purpose
    echo python -m fastdense bench --device cuda --model "$model" --batch $batches --dtype bfloat16 --channels-last \
        --mode both --repeats 10 --providers "$@" --json "$out/$name.json" --plot "$out/$name.png"
}
EAGER="torchvision-eager torchvision-memory-efficient fastdense fastdense-memory-efficient"
TRITON="fastdense-triton fastdense-triton-memory-efficient"

# 1. Correctness on the GPU. The kernels and both backends against torchvision at realistic sizes
#    (autotuned kernels, the four ImageNet variants, a buffer past 2^31 elements), then the interpreter's
#    small odd shapes compiled (one fixed configuration per kernel: no tuning per shape).
stage gpu-tests 150 python -m pytest -q -rs tests/test_cuda.py
stage gpu-tests-triton-small 90 env FASTDENSE_AUTOTUNE=0 python -m pytest -q -rs tests/test_kernels.py \
    tests/test_triton_backend.py
# CUDA graphs (eager capture, both backends) and torch.compile: fullgraph, mode="reduce-overhead".
stage gpu-tests-graphs-compile 90 python -m pytest -q -rs tests/test_cuda_graphs.py
# 2. Kernel microbenchmarks: BN-ReLU-GEMM vs cat+BN+ReLU+cuDNN 1x1, implicit-GEMM 3x3 vs cuDNN (GB/s, TFLOP/s).
stage kernels 40 python -m fastdense kernels --json "$out/kernels.json"
# 3. The baselines and fastdense at the report's sizes: bf16, channels_last, batch 64 and 256, both modes.
# shellcheck disable=SC2046,SC2086
stage bench-densenet121 130 $(bench bench-densenet121 densenet121 "64 256" $EAGER $TRITON)
# 4. The triton backend with cuDNN's 3x3 conv instead of the implicit GEMM (which one to keep).
# shellcheck disable=SC2046
stage bench-densenet121-conv-cudnn 60 env FASTDENSE_CONV3X3=cudnn $(bench bench-densenet121-conv-cudnn \
    densenet121 256 torchvision-eager fastdense-triton)
# 5. The largest batch each trains in the card's memory (doubling, then bisection to ~6%; OOM handled).
stage max-batch-densenet121 80 python -m fastdense bench --device cuda --model densenet121 --batch 256 \
    --dtype bfloat16 --channels-last --mode train --repeats 3 --max-batch --json "$out/bench-max-batch.json" \
    --providers torchvision-eager torchvision-memory-efficient fastdense-triton fastdense-triton-memory-efficient
# 5b. 3-D: MONAI's DenseNet121 on 128^3 volumes against its fastdense conversion (issue 15), batch 2.
stage volumes-128 60 python -m fastdense volumes --device cuda --volumes 128 --batch 2 --repeats 3 \
    --providers monai-eager fastdense fastdense-memory-efficient --json "$out/volumes-128.json"
# 6. torch.compile of torchvision and of fastdense (its blocks are opaque operators; compilation is
#    reported separately as first_step_s), densenet121.
# shellcheck disable=SC2046
stage bench-densenet121-compile 140 $(bench bench-densenet121-compile densenet121 "64 256" torchvision-eager \
    torch-compile fastdense-compile fastdense-triton-compile)
# 7. Less urgent, last, so that a cut costs nothing above.
# shellcheck disable=SC2046,SC2086
stage bench-densenet201 110 $(bench bench-densenet201 densenet201 "64 256" $EAGER $TRITON)
# shellcheck disable=SC2046
stage bench-densenet121-compile-modes 60 $(bench bench-densenet121-compile-modes densenet121 256 \
    torchvision-eager torch-compile-reduce-overhead torch-compile-max-autotune)

# Short tables last: the kernels, the 3-D rows, then every row measured against torchvision eager in the same process.
[ -f "$out/volumes-128.log" ] && grep -A8 "^monai-densenet121-3d" "$out/volumes-128.log"
[ -f "$out/kernels.json" ] && python - "$out/kernels.json" <<'PY'
import json, sys
result = json.load(open(sys.argv[1]))
print(f"\nkernels on {result['device']}, {result['dtype']}, batch {result['batch']}")
for r in result["rows"]:
    print(f"{r['kernel']:13} {r['shape']:28} {r['candidate']:34} {r['ms']:8.3f} ms {r['GB_per_s']:6.0f} GB/s "
          f"({r['copy_fraction']:.2f} of copy) {r['TFLOP_per_s']:6.1f} TFLOP/s ({r['matmul_fraction']:.2f} of matmul)")
PY
python - "$out" <<'PY'
import glob, json, sys
print(f"\n{'file':32} {'provider':30} {'mode':5} {'batch':>5} {'images/s':>9} {'speed':>6} {'peak MiB':>9} "
      f"{'memory':>6} {'first s':>7} {'max_rel_err':>11}")
for path in sorted(glob.glob(f"{sys.argv[1]}/bench-*.json")):
    result = json.load(open(path))
    rows = [r for r in result["rows"] if "ms_median" in r]
    base = {(r["mode"], r["batch"]): r for r in rows if r["provider"] == "torchvision-eager"}
    name = path.rsplit("/", 1)[-1][:-5] + ("" if result.get("complete") else " (cut)")
    for r in rows:
        b = base.get((r["mode"], r["batch"]), {})
        speed = b["ms_median"] / r["ms_median"] if b else float("nan")
        memory = r["peak_mem_mb"] / b["peak_mem_mb"] if b and b.get("peak_mem_mb") else float("nan")
        err = "-" if r.get("max_rel_err") is None else f"{r['max_rel_err']:.1e}"
        print(f"{name:32} {r['provider']:30} {r['mode']:5} {r['batch']:5} {r['images_per_s']:9.1f} {speed:5.2f}x "
              f"{r.get('peak_mem_mb', float('nan')):9.0f} {memory:5.2f}x {r['first_step_s']:7.1f} {err:>11}")
    for r in result["rows"]:
        if "max_batch" in r:
            print(f"{name:32} {r['provider']:30} largest training batch: {r['max_batch']} "
                  f"(fails at {r.get('max_batch_fails')})")
PY
exit $status
