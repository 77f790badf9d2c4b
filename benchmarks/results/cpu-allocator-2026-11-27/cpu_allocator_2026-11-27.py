"""CNN evaluation on the CPU with glibc's default malloc and with freed blocks kept for reuse (hf_permerge/allocator.py).

Usage: [T=threads] .venv/bin/python benchmarks/results/cpu-allocator-2026-11-27/cpu_allocator_2026-11-27.py plain|mmap|trim|tuned
"""
import ctypes, os, sys, time, resource
import torch
torch.set_num_threads(int(os.environ.get("T", "1")))
libc = ctypes.CDLL("libc.so.6")
if sys.argv[1] in ("tuned", "mmap"):
    assert libc.mallopt(-3, 1 << 30) == 1
if sys.argv[1] in ("tuned", "trim"):
    assert libc.mallopt(-1, 1 << 30) == 1
import hf_permerge
from hf_permerge import PermCNNConfig, PermCNNForImageClassification
from hf_permerge.data import load_tensors
test = load_tensors("fashion_mnist", "test")
m = PermCNNForImageClassification(PermCNNConfig(layers="16-16-avg-32-32", seed=0)).eval()
def run():
    with torch.no_grad():
        for s in range(0, 10000, 2000):
            m(pixel_values=test.pixel_values[s:s+2000]).logits
run()
f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
t = time.perf_counter()
for _ in range(3):
    run()
dt = (time.perf_counter() - t) / 3
r = resource.getrusage(resource.RUSAGE_SELF)
print(sys.argv[1], os.environ.get("T", "1"), f"{dt:.2f} s per 10k-image pass, {(r.ru_minflt - f0) / 3:.0f} minor faults per pass")
