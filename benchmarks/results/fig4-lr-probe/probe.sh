#!/usr/bin/env bash
# The edge of stability for SGD + 0.9 momentum on the 32-32-avg-64-64 CNN (Fashion-MNIST, batch 100): one net,
# the first 300 steps (half an epoch) at each learning rate; a rate is stable when the training loss falls
# and stays finite. Fig. 4's large rate is the largest stable one of this grid, its small rate 10x lower.
#   bash benchmarks/results/fig4-lr-probe/probe.sh OUT_DIR   (from a checkout with .venv)
set -uo pipefail
out=${1:-runs/fig4-lr-probe}
for lr in 0.02 0.05 0.1 0.2 0.4; do
  echo "== lr $lr"
  .venv/bin/hf-permerge -q train configs/paper_cnn.yaml -o "$out/lr-$lr" --overwrite \
    --set model.layers=32-32-avg-64-64 --set training.num_nets=1 --set training.lr=$lr \
    --set training.max_steps=300 --set training.save_steps=[] --set training.eval_each_epoch=false 2>&1 | tail -2
done
