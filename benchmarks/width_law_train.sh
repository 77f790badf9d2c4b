#!/usr/bin/env bash
# The width law for transformers (issue 36, item 3): 4-layer GPT-2 LMs on the King James text at hidden sizes 64,
# 128 and 256, six nets per width (three seeds = three pairs: nets 0-1, 2-3, 4-5), on one CPU core, each net
# trained until its held-out loss flattens or its width's step cap comes first.
#
#   nohup bash benchmarks/width_law_train.sh > /work/width-runs/all.log 2>&1 &
#
# Model: configs/kjv_gpt2_tiny.yaml with n_embd = W and n_head = 4 at every width (head size W/4: the same head
# count, hence the same attention groups for the matcher, at every width); the MLP is GPT-2's default 4W.
# Training: AdamW 2e-3, batch 32 x 128 tokens, 50 warm-up steps, then a CONSTANT learning rate (no cosine decay,
# so the curve flattens by training, not by the schedule).
# Stopping criterion (training.stop_when_flat, hf_permerge/training/flat_stop.py): the held-out loss (the 801
# held-out blocks, every net) is evaluated every 64 steps (4 times an epoch of 256 steps); a net stops at the
# first evaluation where the best of its last 4 evaluations (one epoch) is not more than 0.01 nats below the best
# of all its evaluations before them. It is saved as it is at that step (net_i/final); its stop record (step,
# reason "flat", best evaluation) is in net_i/log_history.json and pair.json (nets[i].stop), its curve in
# log_history. Every net is also saved at step 256 (one epoch: the same training length at every width) where
# its width's cap is longer.
# Step caps (training.max_steps; a net that reaches its cap before flattening says reason "end"): the CPU budget
# decides them, from the seconds per step measured for six nets (an evaluation every 64 steps included; times the
# slowdown the previous width saw on the shared machine, and a 15% margin) and the time left before DEADLINE:
# width 64 at most a quarter of the time left, width 128 at most 40% of what is left when it starts, width 256
# all that is left; 1024 steps (4 epochs) at most. Each cap
# is written to OUT/gpt2_hW.max_steps when its width starts and reused on a rerun, so that --resume continues it
# (a killed run: rerun this script; finished widths, with a pair.json, are skipped).
# WIDTHS (default "64 128 256") picks the widths; a width's cap can be fixed beforehand in OUT/gpt2_hW.max_steps
# (then no estimate is made for it).
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
export HF_PERMERGE_CACHE=${HF_PERMERGE_CACHE:-/work/width-cache}
OUT=${OUT:-/work/width-runs}
DEADLINE=${DEADLINE:-05:35}  # UTC: all training done by then
HF=${HF:-.venv/bin/hf-permerge}
PY=${PY:-.venv/bin/python}
mkdir -p "$OUT"

# seconds per step for six nets on one idle core (a step of each net + an evaluation every 64 steps: 0.251, 0.543,
# 1.289 s a step and 2.51, 5.37, 12.65 s an evaluation per net, measured at widths 64, 128, 256), and the seconds a
# width's start and end take (loading; pair.json evaluates every final net once more)
BASE="{64: 1.74, 128: 3.76, 256: 8.92}"
FIXED="{64: 40, 128: 60, 256: 120}"
SHARE="{64: 0.25, 128: 0.40, 256: 1.0}"
MAX_STEPS=1024

# the cap of width $1: (time left x its share - fixed) / (base cost x slowdown x 1.15), the slowdown that of the
# last finished width (its train_s against its base cost for its nets' mean step count; 1.3 before any: the
# machine is shared)
cap() {
  "$PY" - "$1" "$(( $(date -u -d "$DEADLINE" +%s) - $(date -u +%s) ))" "$OUT" <<PYEOF
import json, sys
from pathlib import Path
w, left, out = int(sys.argv[1]), float(sys.argv[2]), Path(sys.argv[3])
base, fixed, share = $BASE, $FIXED, $SHARE
slowdown = 1.3
for prev in (64, 128, 256):
    pair = out / f"gpt2_h{prev}" / "pair.json"
    if prev < w and pair.is_file():
        p = json.loads(pair.read_text())
        mean_steps = sum(n["stop"]["step"] for n in p["nets"]) / len(p["nets"])
        slowdown = max(0.8, p["timings"]["train_s"] / (mean_steps * base[prev]))
cost = base[w] * slowdown * 1.15
steps = max(0, min($MAX_STEPS, int((left * share[w] - fixed[w]) / cost)))
print(steps)
print(f"width {w}: {left:.0f} s left, share {share[w]}, slowdown {slowdown:.2f}, {cost:.2f} s a step: cap {steps}",
      file=sys.stderr)
PYEOF
}

for W in ${WIDTHS:-64 128 256}; do
  run="$OUT/gpt2_h$W"
  log="$OUT/train_h$W.log"
  if [ -f "$run/pair.json" ]; then
    echo "$(date -u +%T) width $W: done already ($run/pair.json)"
    continue
  fi
  [ -f "$run.max_steps" ] || cap "$W" > "$run.max_steps"
  steps=$(cat "$run.max_steps")
  if [ "$steps" -lt 64 ]; then
    echo "$(date -u +%T) width $W: no time left before $DEADLINE UTC (cap $steps steps); not trained"
    continue
  fi
  resume=()
  [ -f "$run/run_config.json" ] && resume=(--resume)
  echo "$(date -u +%T) width $W: cap $steps steps, log $log"
  "$HF" train configs/kjv_gpt2_tiny.yaml -o "$run" "${resume[@]}" \
    --set training.num_nets=6 \
    --set model.config.n_embd=$W --set model.config.n_head=4 \
    --set training.lr_schedule=constant --set training.warmup_steps=50 \
    --set training.epochs=4 --set training.max_steps=$steps \
    --set training.eval_steps=64 --set training.eval_each_epoch=false \
    --set "training.stop_when_flat={patience: 4, min_delta: 0.01}" \
    --set "training.save_steps=[$( [ "$steps" -gt 256 ] && echo 256 )]" \
    >> "$log" 2>&1 || echo "$(date -u +%T) width $W: training failed (rc $?); see $log"
  echo "$(date -u +%T) width $W: finished"
done
echo "$(date -u +%T) all widths done"
