"""Curve time against images per pass for a 32-32-avg-64-64 CNN on the CPU (5 points x 2000 test images, best of 3)."""
import time, torch, hf_permerge
from hf_permerge.config import config_from_dict
from hf_permerge.training.builders import build_model
from hf_permerge.evaluation.interpolation import evaluate_curve
from hf_permerge.data.tensors import load_tensors
cfg = config_from_dict({"model": {"type": "cnn", "layers": "32-32-avg-64-64"}})
a, b = build_model(cfg,0).eval(), build_model(cfg,1).eval()
test = load_tensors("fashion_mnist","test").subset(2000, seed=0)
res = {}
for rep in range(3):
    for bs in (128, 1000, 10000):
        s=time.perf_counter(); evaluate_curve(a, a.state_dict(), b.state_dict(), [0, .25, .5, .75, 1], {"test": test}, batch_size=bs); res.setdefault(bs, []).append(time.perf_counter()-s)
print({k: round(min(v),2) for k,v in res.items()})
