#!/usr/bin/env bash
# One GPU session's measurements for issue 6, as one prepared device call (see BENCHMARKS.md).
#
# Prepare here (CPU machine), once per session:
#   bash benchmarks/gpu_session.sh --prepare        # wheels the GPU image lacks -> .whl/, Fashion-MNIST -> .data/
# Then one device call (device tool `run`):
#   carry: [".whl", ".data"]   command: bash benchmarks/gpu_session.sh   timeout_s: 600
# then give the machine back (device tool `give_back`): 15 device minutes include the start.
# It checks the GPU, runs the CUDA-only tests (CUDA graphs against eager steps), the Fig. 2 grid's width-8192
# stacks as a sweep in fp32 (300 s at most) and with tf32 in training and curves (200 s), then the 2x2048
# and 1x8192 alignments with the time left; every step is cut to end before 575 s, and JSON results and logs (8 files at most)
# come back under $OUT. The second session (2026-11-27) measured the rest (BENCHMARKS.md); its script is in
# git history (commit 6c32400).
# `PART=more` runs only the last step (a second call on a warm machine).
# The CPU dry run of the plumbing:
#   OUT=/tmp/gpu_dry bash benchmarks/gpu_session.sh --dry-run
set -euo pipefail
cd "$(dirname "$0")/.."

if [[ "${1:-}" == "--prepare" ]]; then
    grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo /.whl/ >> .git/info/exclude
    grep -qx '/.data/' .git/info/exclude 2>/dev/null || echo /.data/ >> .git/info/exclude
    # The GPU image (Python 3.12) has torch, transformers, accelerate, scipy, matplotlib, pyyaml, jinja2, tqdm,
    # pillow, safetensors; it lacks pydantic (config validation). datasets / evaluate are not needed here.
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d .whl pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5
    mkdir -p .data/fashion-mnist && cp /usr/share/datasets/fashion-mnist/*-ubyte.gz .data/fashion-mnist/
    du -sh .whl .data
    exit 0
fi

DRY=0
[[ "${1:-}" == "--dry-run" ]] && DRY=1
OUT=${OUT:?set OUT to the folder that comes back}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
PY=python3
if [[ $DRY == 1 ]]; then
    PY=${PY_DRY:-.venv/bin/python}
else
    if ls .whl/*.whl >/dev/null 2>&1; then
        python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
        export PYTHONPATH=/tmp/site:$PWD
    else
        export PYTHONPATH=$PWD
    fi
    if [[ -d .data/fashion-mnist && ! -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ]]; then
        mkdir -p /usr/share/datasets && cp -r .data/fashion-mnist /usr/share/datasets/
    fi
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
fi

$PY - <<'EOF' 2>&1 | tee "$OUT/check.txt"
import torch, transformers, accelerate, scipy, pydantic
import hf_permerge
from hf_permerge.data import load_tensors
print("torch", torch.__version__, "cuda", torch.cuda.is_available(), "transformers", transformers.__version__,
      "accelerate", accelerate.__version__, "scipy", scipy.__version__, "pydantic", pydantic.__version__)
print("fashion-mnist train", tuple(load_tensors("fashion_mnist", "train").pixel_values.shape))
EOF
[[ -f "$OUT/gpu.txt" ]] && cat "$OUT/gpu.txt" >> "$OUT/check.txt" && rm "$OUT/gpu.txt"   # at most 8 files come back

tables() {  # tables SWEEP_YAML OUT_DIR NAME: the table of the cells finished so far (a stopped sweep writes none)
    $PY - "$1" "$2" <<'EOF' 2>&1 | tee -a "$OUT/$3.log" || true
import sys
from pathlib import Path
from hf_permerge.sweeps import load_sweep_config
from hf_permerge.sweeps.runner import write_outputs
files, summary, failed = write_outputs(load_sweep_config(sys.argv[1]), Path(sys.argv[2]))
print(summary)
EOF
    cp "$2/results.json" "$OUT/$3_results.json" 2>/dev/null || true   # the summary is in NAME.log (8 files at most)
}

DEADLINE=$((SECONDS + ${BUDGET:-575}))   # the device call's own limit is 600 s: every step fits before it

step() {  # step NAME SECONDS CMD...: a time-boxed step (cut to the time left) whose log comes back
    local name=$1 limit=$2; shift 2
    local left=$((DEADLINE - SECONDS - 5))
    (( left < limit )) && limit=$left
    if (( limit < 10 )); then echo "SKIPPED $name (no time left)"; return 0; fi
    echo "== $name (limit ${limit}s)"
    local start=$SECONDS
    timeout "$limit" "$@" > "$OUT/$name.log" 2>&1 && echo "ok $name $((SECONDS - start)) s" || echo "FAILED $name rc=$? $((SECONDS - start)) s"
    tail -25 "$OUT/$name.log"
}

if [[ $DRY == 1 ]]; then
    step cuda_tests 300 $PY -m pytest -p no:cacheprovider tests/test_engines.py -k cuda
    step bench 900 $PY benchmarks/run_benchmarks.py --only curves --repeats 1 --out "$OUT"
    step fig2 900 $PY -m hf_permerge.cli -q sweep configs/sweeps/fig2_fmnist_smoke.yaml -o /tmp/gpu_dry_fig2 --overwrite
    tables configs/sweeps/fig2_fmnist_smoke.yaml /tmp/gpu_dry_fig2 fig2
    step bench_more 900 $PY benchmarks/run_benchmarks.py --only align --align 1x64 --repeats 1 --out "$OUT"
else
    if [[ ${PART:-all} == all ]]; then   # PART=more: only the last step (a second call on the warm machine)
        # The CUDA-graph step against eager steps (skipped on the CPU, so only here).
        step cuda_tests 60 $PY -m pytest -p no:cacheprovider tests/test_engines.py -k cuda
        GRAPHS=false
        grep -q " passed" "$OUT/cuda_tests.log" && ! grep -q "failed\|error" "$OUT/cuda_tests.log" && GRAPHS=true
        # What the second GPU session (BENCHMARKS.md) left unmeasured: the Fig. 2 grid's width-8192 stacks
        # (depths 1-3, 6 seeds, 5 epochs, fused captured AdamW), in fp32 (estimated: about 250 s) and then
        # with tf32 matmuls; widths 32-4096 took 209 s of training and 66 s of measuring there.
        step fig2 300 $PY -m hf_permerge.cli -q sweep configs/sweeps/fig2_fmnist.yaml -o /tmp/fig2 --overwrite \
            --set training.cuda_graphs=$GRAPHS --set "sweep.grid.model.width=[8192]"
        tables configs/sweeps/fig2_fmnist.yaml /tmp/fig2 fig2
        step fig2_tf32 200 $PY -m hf_permerge.cli -q sweep configs/sweeps/fig2_fmnist.yaml -o /tmp/fig2_tf32 \
            --overwrite --set training.cuda_graphs=$GRAPHS --set "sweep.grid.model.width=[8192]" \
            --set training.precision=tf32 --set evaluation.precision=tf32
        tables configs/sweeps/fig2_fmnist.yaml /tmp/fig2_tf32 fig2_tf32
    fi
    # With the time left: the alignments with the in-place Sinkhorn potentials (the plain 1x8192 solve: 60 s).
    step bench_more 200 $PY benchmarks/run_benchmarks.py --only align --align 2x2048,1x8192 --repeats 1 --out "$OUT"
fi
ls -la "$OUT"
