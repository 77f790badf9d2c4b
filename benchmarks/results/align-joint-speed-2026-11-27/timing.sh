#!/bin/bash
# base (3f03f10: before the carried potentials and the faster cost/star reuse) vs new, interleaved, 1 thread
for m in weight activation; do
  for v in base new; do
    OMP_NUM_THREADS=1 PYTHONPATH=/tmp/clone_$v /work/main/.venv/bin/python time_alignment.py $m average /tmp/joint/t_${v}_$m.pt 2>/dev/null | sed "s/^/$v /"
  done
done
