"""Speed of the solves beyond permutations against plain loops, in the same run: the orthogonal stream's Procrustes
(the cross sum_k A_k B_k^T over a LLaMA-like layer stack, then one SVD) and the per-head least-squares fits (every
invertible map, and rotary rotation-scalings), each checked to give the reference's answer.

    OMP_NUM_THREADS=1 python benchmarks/beyond_speed.py                    # d = 256, 512, 1024
    OMP_NUM_THREADS=1 python benchmarks/beyond_speed.py --widths 256 --out /tmp/x.json

The references are what one writes first: the cross one stream unit at a time (a row of each tensor against all of
b's), a head's moments one pair of units at a time, each pair's rotation-scaling from its own rows. Ours: one matrix
product per tensor and one SVD; per-head moments batched over heads (never the full units x units product) and one
batched solve. Tensors are random
(timing does not depend on the values); b is a planted element of a, so both sides must find it.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from hf_permerge.alignment import per_head  # noqa: E402
from hf_permerge.alignment.beyond import procrustes, random_orthogonal  # noqa: E402

COMMAND = "OMP_NUM_THREADS=1 python benchmarks/beyond_speed.py"


def timed(fn, repeats: int = 3):
    """(best seconds of `repeats` calls, the last result)."""
    best, out = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - start)
    return best, out


def stream_tensors(d: int, layers: int, vocab: int, gen) -> list[torch.Tensor]:
    """The stream's tensors with the stream on the rows: embedding, q/k/v/o, gate/up/down per layer, LM head."""
    shapes = [(d, vocab)] + [(d, d)] * 4 * layers + [(d, 8 * d // 3)] * 3 * layers + [(d, vocab)]
    return [torch.randn(s, generator=gen, dtype=torch.float64) for s in shapes]


def cross_vectorised(a, b) -> torch.Tensor:
    return sum(x @ y.T for x, y in zip(a, b))


def cross_loop(a, b) -> torch.Tensor:
    d = len(a[0])
    out = torch.zeros(d, d, dtype=torch.float64)
    for x, y in zip(a, b):
        for i in range(d):
            out[i] += y @ x[i]
    return out


def head_rows(d: int, width: int, gen) -> torch.Tensor:
    return torch.randn(d, d + 1, generator=gen, dtype=torch.float64)  # a projection's rows and its bias


def fits_vectorised(xa, xb, width: int, pairs) -> torch.Tensor:
    cab, cbb = per_head.head_moments_of_rows(xa, xb, len(xa) // width)
    return torch.block_diag(*per_head.fit_heads(cab, cbb, pairs))


def fits_loop(xa, xb, width: int, pairs) -> torch.Tensor:
    heads = []
    for h in range(len(xa) // width):
        a, b = xa[h * width : (h + 1) * width], xb[h * width : (h + 1) * width]
        if pairs is None:
            cab = torch.zeros(width, width, dtype=torch.float64)
            cbb = torch.zeros(width, width, dtype=torch.float64)
            for i in range(width):
                for j in range(width):
                    cab[i, j], cbb[i, j] = a[i] @ b[j], b[i] @ b[j]
            heads.append(torch.linalg.solve(cbb, cab.T).T)
            continue
        m = torch.zeros(width, width, dtype=torch.float64)
        for i, j in pairs.tolist():
            norm = b[i] @ b[i] + b[j] @ b[j]
            x, y = (a[i] @ b[i] + a[j] @ b[j]) / norm, (a[j] @ b[i] - a[i] @ b[j]) / norm
            m[i, i], m[i, j], m[j, i], m[j, j] = x, -y, y, x
        heads.append(m)
    return torch.block_diag(*heads)


def run(d: int, layers: int, vocab: int, width: int) -> dict:
    gen = torch.Generator().manual_seed(d)
    a = stream_tensors(d, layers, vocab, gen)
    q0 = random_orthogonal(d, gen)
    b = [q0 @ x for x in a]
    ours_s, q = timed(lambda: procrustes(cross_vectorised(a, b)))
    ref_s, q_ref = timed(lambda: procrustes(cross_loop(a, b)), repeats=1)
    assert torch.allclose(q, q0.T, atol=1e-8) and torch.allclose(q_ref, q0.T, atol=1e-8)
    row = {"d": d, "layers": layers, "procrustes": {"ours_s": ours_s, "loop_s": ref_s, "ratio": ref_s / ours_s}}
    xa = head_rows(d, width, gen)
    for kind, pairs in (("invertible", None), ("rotary", per_head.pairings(width)[f"halves of {width}"])):
        heads = len(xa) // width
        if pairs is None:
            m0 = torch.block_diag(
                *[torch.eye(width) + 0.3 * torch.randn(width, width, generator=gen) for _ in range(heads)]
            )
        else:
            ab = torch.rand(heads, len(pairs), 2, generator=gen, dtype=torch.float64) + torch.tensor([0.5, -0.5])
            m0 = torch.block_diag(*[per_head.rotation_scaling(pairs, width, ab[h]) for h in range(heads)])
        xb = torch.linalg.solve(m0.double(), xa)  # m0 xb = xa: the fit must find m0
        ours_h, m = timed(lambda xb=xb, pairs=pairs: fits_vectorised(xa, xb, width, pairs))
        ref_h, m_ref = timed(lambda xb=xb, pairs=pairs: fits_loop(xa, xb, width, pairs), repeats=1)
        assert torch.allclose(m, m0.double(), atol=1e-6) and torch.allclose(m_ref, m0.double(), atol=1e-6)
        row[f"per_head_{kind}"] = {"heads": heads, "ours_s": ours_h, "loop_s": ref_h, "ratio": ref_h / ours_h}
    return row


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--widths", type=int, nargs="+", default=[256, 512, 1024])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=2048)
    parser.add_argument("--head-width", type=int, default=64)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "beyond-speed.json")
    args = parser.parse_args(argv)
    rows = [run(d, args.layers, args.vocab, args.head_width) for d in args.widths]
    for r in rows:
        parts = [f"d={r['d']}"] + [
            f"{k}: {v['ours_s'] * 1e3:.1f} ms vs loop {v['loop_s'] * 1e3:.0f} ms ({v['ratio']:.0f}x)"
            for k, v in r.items()
            if isinstance(v, dict)
        ]
        print(" | ".join(parts))
    record = {
        "command": COMMAND,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "machine": platform.processor() or platform.machine(),
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=1) + "\n")


if __name__ == "__main__":
    main()
