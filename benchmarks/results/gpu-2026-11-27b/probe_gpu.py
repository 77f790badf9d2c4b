import sys, time, torch
sys.path.insert(0, "benchmarks")
from run_benchmarks import run_config
from hf_permerge.data.tensors import load_tensors
from hf_permerge.training import build_model
from hf_permerge.training import engines
from hf_permerge.training.engines import make_engine
from hf_permerge.training.seeds import epoch_order
dev = torch.device("cuda")
train = load_tensors("fashion_mnist", "train", dev)
orig = engines.make_optimizer
def fused_capturable(params, tc, capturable=False):
    params = list(params)
    return torch.optim.AdamW(params, lr=tc.lr, weight_decay=tc.weight_decay, capturable=capturable, fused=True)
for depth, width in ((3, 4096), (2, 2048)):
    cfg = run_config({"type": "mlp", "depth": depth, "width": width}, 12)
    for name, graph, opt, tf32 in (("eager fused", False, orig, False), ("graph foreach", True, orig, False),
                                   ("graph fused", True, fused_capturable, False), ("eager fused tf32", False, orig, True)):
        try:
            torch.backends.cuda.matmul.allow_tf32 = tf32
            engines.make_optimizer = opt
            eng = make_engine("stacked", [build_model(cfg, i) for i in range(12)], cfg.training, dev, cuda_graph=graph)
            orders = torch.stack([epoch_order(1000 + i, 0, len(train), dev) for i in range(12)])
            for b in range(10):
                eng.step(*train.batches(orders[:, b * 100:(b + 1) * 100]))
            torch.cuda.synchronize(); t = time.perf_counter()
            for b in range(10, 60):
                eng.step(*train.batches(orders[:, b * 100:(b + 1) * 100]))
            torch.cuda.synchronize(); dt = (time.perf_counter() - t) / 50
            print(f"{depth}x{width} x12 {name}: {dt*1e3:.2f} ms/step", flush=True)
            del eng
        except Exception as e:
            print(f"{depth}x{width} x12 {name}: FAILED {type(e).__name__}: {str(e)[:200]}", flush=True)
        finally:
            engines.make_optimizer = orig
            torch.backends.cuda.matmul.allow_tf32 = False
