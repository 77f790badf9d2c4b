import sys, time, json, collections
import torch
from hf_permerge.alignment import hungarian
from hf_permerge.merging import PermMerger
T = collections.defaultdict(float); N = collections.Counter()
def timed(name, f):
    def g(*a, **k):
        t = time.perf_counter(); r = f(*a, **k); T[name] += time.perf_counter() - t; N[name] += 1; return r
    return g
hungarian.entropic_duals = timed("sinkhorn", hungarian.entropic_duals)
hungarian.solve_on_host = timed("scipy", hungarian.solve_on_host)
matcher, reference = sys.argv[1], sys.argv[2]
merger = PermMerger.from_pretrained("/tmp/joint/w2048")
t = time.perf_counter()
perms = merger.align(matcher=matcher, reference=reference)
total = time.perf_counter() - t
print(json.dumps({"matcher": matcher, "reference": reference, "total_s": round(total, 1),
                  "rounds": merger.alignment.get("rounds"), **{k: round(v, 1) for k, v in T.items()}, "calls": dict(N)}))
torch.save([{g: p[g] for g in p.keys()} if hasattr(p, "keys") else p for p in perms], sys.argv[3])
