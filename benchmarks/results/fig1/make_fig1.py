"""Fig. 1's numeric grid and heat map from a run's report.json: `python make_fig1.py RUN_DIR OUT_DIR`.

Writes OUT_DIR/plane.json (u, v, the three nets' coordinates and own accuracies, the test-accuracy grids,
trained and init) and OUT_DIR/plane.png (the run's own plot, copied)."""
from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

run, out = Path(sys.argv[1]), Path(sys.argv[2])
out.mkdir(parents=True, exist_ok=True)
report = json.loads((run / "report.json").read_text())
plane = {ck: {"u": p["u"], "v": p["v"], "points": p["points"],
              "at_points": {n: v["test"]["acc"] for n, v in p["at_points"].items()},
              "test_acc": p["test"]["acc"]} for ck, p in report["plane"].items()}
(out / "plane.json").write_text(json.dumps({"command": report.get("command"), "plane": plane}, indent=1) + "\n")
shutil.copy(run / "plane.png", out / "plane.png")
for ck, p in plane.items():
    print(ck, {n: round(a, 4) for n, a in p["at_points"].items()},
          "grid max", round(max(max(r) for r in p["test_acc"]), 4), "min", round(min(min(r) for r in p["test_acc"]), 4))
