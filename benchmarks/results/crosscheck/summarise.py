"""Tables of the cross-evaluation rows (crosscheck.py's JSON files): per pair, and means over seeds.

  .venv/bin/python benchmarks/results/crosscheck/summarise.py benchmarks/results/crosscheck/*.json
"""
import json
import sys
from collections import defaultdict

import numpy as np

KEYS = ("vanilla", "permuted", "vanilla_init", "permuted_init")


def main(paths):
    rows = [r for p in paths if "rows" in (d := json.load(open(p))) for r in d["rows"]]
    print("| setting | normalisation | seed | nets from | matched by | evaluated by | single | vanilla | permuted "
          "| vanilla init | permuted init |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['arch']} {r['epochs']} ep | {r['norm']} | {r['seed']} | {r['nets']} | {r['matcher']} | "
              f"{r['evaluator']} | {r['single'][0]:.3f} / {r['single'][1]:.3f} | "
              + " | ".join(f"{r[k]:.3f}" for k in KEYS) + " |")
    groups = defaultdict(list)
    for r in rows:
        if r["matcher"] == r["evaluator"]:
            groups[(r["arch"], r["epochs"], r["norm"], r["nets"], r["matcher"])].append(r)
    print("\n| setting | normalisation | nets from | matched + evaluated by | seeds | single | permuted "
          "| permuted init (per seed) | permuted init mean ± sem |")
    print("|---|---|---|---|---|---|---|---|---|")
    for (arch, ep, norm, nets, m), rs in sorted(groups.items()):
        pi = np.array([r["permuted_init"] for r in rs])
        sem = pi.std(ddof=1) / np.sqrt(len(pi)) if len(pi) > 1 else float("nan")
        single = np.mean([s for r in rs for s in r["single"]])
        print(f"| {arch} {ep} ep | {norm} | {nets} | {m} | {','.join(str(r['seed']) for r in rs)} | {single:.3f} | "
              f"{np.mean([r['permuted'] for r in rs]):.3f} | {' / '.join(f'{v:.3f}' for v in pi)} | "
              f"{pi.mean():.3f} ± {sem:.3f} |")


if __name__ == "__main__":
    main(sys.argv[1:])
