"""Fig. 4 at k = 32: the large rate minus the small one, seed by seed (the two cells of a seed share their
inits and data order), as mean ± Student-t 95% half-width over the seeds.

    python benchmarks/results/fig4-k32/paired.py benchmarks/results/fig4-k32/results.json
    python benchmarks/results/fig4-k32/paired.py benchmarks/results/appF-family2-k32/results.json case

The optional second argument names the key that holds the rate (App. F.2's sweep names its cases "sgd lr 0.02");
any two-valued key works (`alignment.subset`: per_seed minus fixed).
"""

import json
import sys

from hf_permerge.evaluation.statistics import t_interval

METRICS = ["single_acc", "vanilla_acc", "perm_acc", "barrier_perm_acc", "barrier_perm_loss", "init_perm_acc"]

KEY = sys.argv[2] if len(sys.argv) > 2 else "training.lr"
cells = [c for c in json.load(open(sys.argv[1]))["cells"] if c.get("status") == "done"]


def order(value):
    """A rate's number ("sgd lr 0.02" -> 0.02); other values (e.g. alignment.subset) sort by name."""
    try:
        return float(str(value).split()[-1])
    except ValueError:
        return str(value)


rates = sorted({c[KEY] for c in cells}, key=order)
small, large = rates[0], rates[-1]
by = {(c["training.seed"], c[KEY]): c for c in cells}
seeds = sorted(s for s, lr in by if lr == small and (s, large) in by)
print(f"{KEY} {large} minus {small}, paired by seed, n = {len(seeds)} (seeds {seeds})\n")
print("| metric | " + " | ".join(f"seed {s}" for s in seeds) + " | mean ± t95 |")
print("|---|" + "---|" * (len(seeds) + 1))
for metric in METRICS:
    diffs = [by[(s, large)][metric] - by[(s, small)][metric] for s in seeds]
    mean, half = t_interval(diffs)
    interval = f"{mean:+.3f} ± {half:.3f}" if half is not None else f"{mean:+.3f}"
    print(f"| {metric} | " + " | ".join(f"{d:+.3f}" for d in diffs) + f" | {interval} |")
