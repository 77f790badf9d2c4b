#!/usr/bin/env bash
# The reduced CPU runs of REPRODUCING.md: each paper figure's config, shrunk with --set, on real
# Fashion-MNIST, two CPU processes sharing the cells. Usage: examples/reproduce_cpu.sh [figure ...]
# (figures: fig2 fig3_left fig3_mid fig3_right fig4 fig4_right fig11 appB appF; default all). Output: runs/cpu/<figure>/.
# Each run is resumable: run the same line again to finish an interrupted sweep. SEEDS=[0,1,2] replaces each
# figure's seeds (e.g. SEEDS=[0,1,2] OUT=runs/cpu3 examples/reproduce_cpu.sh fig11).
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=1
LAUNCH=(.venv/bin/accelerate launch --config_file examples/accelerate_cpu_2proc.yaml examples/sweep.py -q)
OUT=${OUT:-runs/cpu}
EVAL=(--set evaluation.splits=[test])

run() {  # run NAME CONFIG ARGS...: time one sweep, keep its log
    local name=$1 config=$2; shift 2
    mkdir -p "$OUT"
    /usr/bin/time -f "$name: %e s wall, %U s user, %S s sys" -o "$OUT/$name.time" \
        "${LAUNCH[@]}" "$config" -o "$OUT/$name" "$@" ${SEEDS:+--set "sweep.grid.training.seed=$SEEDS"} 2>&1 | grep -v "^\s*$" | tee "$OUT/$name.log" | tail -n 25
    cat "$OUT/$name.time"
}

fig2() { run fig2 configs/sweeps/fig2_fmnist.yaml "${EVAL[@]}" --set training.epochs=1 --set evaluation.num_lambdas=5 \
    --set "sweep.grid.model.width=[32,128,512]" --set "sweep.grid.model.depth=[1,2]" --set "sweep.grid.training.seed=[0,1]"; }
fig3_left() { run fig3_left configs/sweeps/fig3_left.yaml "${EVAL[@]}" --set training.epochs=1 --set model.width=512 \
    --set evaluation.num_lambdas=11 --set "sweep.grid.training.seed=[0,1]"; }
fig3_mid() { run fig3_mid configs/sweeps/fig3_mid.yaml "${EVAL[@]}" --set training.num_nets=4 --set evaluation.num_lambdas=3 \
    --set "sweep.grid.model.width=[32,128,512]" --set "sweep.grid.training.seed=[0]"; }
fig3_right() { run fig3_right configs/sweeps/fig3_right.yaml "${EVAL[@]}" --set training.epochs=1 --set model.width=512 \
    --set "training.save_steps=[1,2,5,10,20,50,100,200,400]" --set evaluation.num_lambdas=3 --set "sweep.grid.training.seed=[0]"; }
fig4() { run fig4 configs/sweeps/fig4_cnn_small.yaml "${EVAL[@]}" --set model.layers=16-16-avg-32-32 --set training.max_steps=300 \
    --set evaluation.num_lambdas=3 --set "sweep.cases={sgd lr 0.01: {training.optimizer: sgd, training.lr: 0.01}, sgd lr 0.1: {training.optimizer: sgd, training.lr: 0.1}}" \
    --set "sweep.grid.training.seed=[0,1]"; }
fig4_right() { run fig4_right configs/sweeps/fig4_right.yaml "${EVAL[@]}" --set model.layers=16-16-avg-32-32 \
    --set training.max_steps=300 --set "training.save_steps=[1,2,5,10,20,50,100,200]" --set evaluation.num_lambdas=3 \
    --set "sweep.grid.training.seed=[0]"; }
appF() { run appF configs/sweeps/appF_cnn_families.yaml "${EVAL[@]}" \
    --set "sweep.grid.model.layers=[16-16-avg-32-32,16-avg-32-avg-64]" --set training.max_steps=300 \
    --set evaluation.num_lambdas=3 --set "sweep.cases={sgd lr 0.01: {training.lr: 0.01}}" --set "sweep.grid.training.seed=[0,1]"; }
fig11() { run fig11 configs/sweeps/fig11_init_loss.yaml "${EVAL[@]}" --set training.epochs=1 --set model.width=256 \
    --set evaluation.num_lambdas=3 --set "sweep.grid.training.seed=[0]"; }
appB() { run appB configs/sweeps/appB_matchers.yaml "${EVAL[@]}" --set evaluation.num_lambdas=3 \
    --set "sweep.matchers={activation@final: {matcher: activation, checkpoint: final}, gradient-foof@init: {matcher: gradient, checkpoint: init, preconditioner: foof}, gradient-raw@init: {matcher: gradient, checkpoint: init, preconditioner: none}, activation@init: {matcher: activation, checkpoint: init}, weight-appD@final: {matcher: weight, checkpoint: final, bottom_up: true, max_iter: 0}, weight-rebasin@final: {matcher: weight, checkpoint: final, bottom_up: false}}" \
    --set sweep.cases.mlp.model.width=256 --set sweep.cases.mlp.training.max_steps=600 \
    --set sweep.cases.cnn.model.layers=8-8-avg-16-16 --set sweep.cases.cnn.training.max_steps=300 \
    --set "sweep.grid.training.seed=[0]"; }

for figure in "${@:-fig2 fig3_left fig3_mid fig3_right fig4 fig4_right fig11 appB appF}"; do
    for f in $figure; do "$f"; done
done
