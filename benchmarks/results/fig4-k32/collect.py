"""The finished cells of a running Fig. 4 (k = 32) sweep as rows for benchmarks/reproducing_tables.py:
`python collect.py SWEEP_DIR OUT.json` (each cell's values, metrics and timings; its result.json copied beside)."""
import json
import shutil
import sys
from pathlib import Path

sweep, out = Path(sys.argv[1]), Path(sys.argv[2])
rows = []
for result in sorted(sweep.glob("cells/*/result.json")):
    data = json.loads(result.read_text())
    values = dict(part.split("=", 1) for part in result.parent.name.split("_"))
    rows.append({"cell": result.parent.name, "training.lr": float(values["lr"]), "training.seed": int(values["seed"]),
                 "status": "done", **data["metrics"], **{k: v for k, v in data.get("timings", {}).items()}})
    (out.parent / "cells" / result.parent.name).mkdir(parents=True, exist_ok=True)
    shutil.copy(result, out.parent / "cells" / result.parent.name / "result.json")
out.write_text(json.dumps(rows, indent=1) + "\n")
print(f"{len(rows)} cells")
