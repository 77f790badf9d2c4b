"""Training engines: N nets of one architecture stacked into batched ops, or one module per net.

Both take one optimiser step per net per call to `step`, each net on its own batch. AdamW and
SGD act elementwise, so one optimiser over stacked parameters equals N independent ones.
"""
from __future__ import annotations

import torch
from torch.func import functional_call

from .checkpoints import optimizer_state_from_tensors, optimizer_state_to_tensors


def make_optimizer(params, tc):
    if tc.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=tc.lr, weight_decay=tc.weight_decay)
    return torch.optim.SGD(params, lr=tc.lr, momentum=tc.momentum, weight_decay=tc.weight_decay)


def _autocast(device: torch.device, precision: str):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")


@torch.no_grad()
def eval_loss_acc(forward, x, y, loss_fn, chunk: int):
    """Mean loss and accuracy over a split, in chunks, with one host sync at the end."""
    loss_sum = torch.zeros((), device=x.device)
    correct = torch.zeros((), device=x.device, dtype=torch.long)
    for s in range(0, len(y), chunk):
        logits = forward(x[s:s + chunk]).float()
        loss_sum += loss_fn(logits, y[s:s + chunk]) * len(y[s:s + chunk])
        correct += (logits.argmax(-1) == y[s:s + chunk]).sum()
    return (loss_sum / len(y)).item(), correct.item() / len(y)


class PerNetEngine:
    """One ordinary module and optimiser per net: works for every architecture (BatchNorm included)."""

    name = "per_net"

    def __init__(self, models, tc, device):
        self.models = [m.to(device).train() for m in models]
        self.optimizers = [make_optimizer(m.parameters(), tc) for m in self.models]
        self.precision = tc.precision
        self.device = device

    def step(self, xs: list[torch.Tensor], ys: list[torch.Tensor]) -> torch.Tensor:
        losses = []
        for model, opt, x, y in zip(self.models, self.optimizers, xs, ys):
            with _autocast(self.device, self.precision):
                loss = model(pixel_values=x, labels=y, return_dict=False)[0]
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(loss.detach())
        return torch.stack(losses)

    def export(self, i: int):
        return self.models[i]

    def optimizer_state(self, i: int):
        return optimizer_state_to_tensors(self.optimizers[i].state_dict())

    def load_optimizer_state(self, i: int, tensors, meta) -> None:
        self.optimizers[i].load_state_dict(optimizer_state_from_tensors(tensors, meta))

    def evaluate(self, x, y, chunk=10000):
        out = []
        for m in self.models:
            m.eval()
            out.append(eval_loss_acc(lambda b: m(pixel_values=b, return_dict=False)[0], x, y,
                                         m.compute_loss, chunk))
            m.train()
        return out


class StackedEngine:
    """N nets as one set of stacked parameters; forward is `vmap(functional_call)` over the net axis.

    Buffers (none without BatchNorm) are not supported: BatchNorm nets use `PerNetEngine`.
    """

    name = "stacked"

    def __init__(self, models, tc, device):
        if any(True for m in models for _ in m.buffers()):
            raise ValueError("the stacked engine does not support models with buffers (BatchNorm); "
                             "use training.engine=per_net")
        self.template = models[0].to(device)
        self.models = models
        names = [n for n, _ in models[0].named_parameters()]
        self.params = {n: torch.stack([dict(m.named_parameters())[n].detach().to(device) for m in models])
                       .requires_grad_(True) for n in names}
        self.optimizer = make_optimizer(list(self.params.values()), tc)
        self.precision = tc.precision
        self.device = device

        def one_loss(params, x, y):
            logits = functional_call(self.template, params, (x,), {"return_dict": False})[0]
            return self.template.compute_loss(logits.float(), y)

        def one_logits(params, x):
            return functional_call(self.template, params, (x,), {"return_dict": False})[0]

        self._losses = torch.vmap(one_loss)
        self._logits = torch.vmap(one_logits, in_dims=(0, None))

    def step(self, xs: list[torch.Tensor], ys: list[torch.Tensor]) -> torch.Tensor:
        with _autocast(self.device, self.precision):
            losses = self._losses(self.params, torch.stack(xs), torch.stack(ys))
        self.optimizer.zero_grad(set_to_none=True)
        losses.sum().backward()
        self.optimizer.step()
        return losses.detach()

    @torch.no_grad()
    def export(self, i: int):
        """Net i as an ordinary HF model holding the current stacked weights."""
        model = self.models[i]
        for n, p in model.named_parameters():
            p.copy_(self.params[n][i])
        return model

    def optimizer_state(self, i: int):
        """Net i's slice of the stacked optimiser state, in the same format as `PerNetEngine`'s."""
        sd = self.optimizer.state_dict()
        state = {}
        for idx, entry in sd["state"].items():
            state[idx] = {k: (v[i] if torch.is_tensor(v) and v.ndim > 0 else v) for k, v in entry.items()}
        return optimizer_state_to_tensors({"state": state, "param_groups": sd["param_groups"]})

    def load_optimizer_state(self, i: int, tensors, meta) -> None:
        one = optimizer_state_from_tensors(tensors, meta)
        sd = self.optimizer.state_dict()
        for idx, entry in one["state"].items():
            target = sd["state"].setdefault(idx, {})
            for k, v in entry.items():
                if v.ndim == 0:
                    target[k] = v.clone()
                else:
                    if k not in target:
                        target[k] = torch.zeros_like(list(self.params.values())[idx])
                    target[k][i] = v.to(target[k].device)
        self.optimizer.load_state_dict(sd)

    @torch.no_grad()
    def evaluate(self, x, y, chunk=10000):
        loss_sum = torch.zeros(len(self.models), device=x.device)
        correct = torch.zeros(len(self.models), device=x.device)
        for s in range(0, len(y), chunk):
            logits = self._logits(self.params, x[s:s + chunk]).float()
            yy = y[s:s + chunk]
            loss_sum += torch.stack([self.template.compute_loss(l, yy) for l in logits]) * len(yy)
            correct += (logits.argmax(-1) == yy).sum(-1)
        return [(l, c) for l, c in zip((loss_sum / len(y)).tolist(), (correct / len(y)).tolist())]


def make_engine(kind: str, models, tc, device):
    if kind == "auto":
        kind = "per_net" if any(True for m in models for _ in m.buffers()) else "stacked"
    return {"stacked": StackedEngine, "per_net": PerNetEngine}[kind](models, tc, device)
