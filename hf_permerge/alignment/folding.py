"""The norms a residual stream passes, and the fold of their gains (and LayerNorm biases) into the layers that read
them, which is what lets the stream admit orthogonal maps while the checkpoint keeps its architecture.

RMSNorm with gain 1 is x / rms(x): any orthogonal Q commutes with it. LayerNorm with weight 1 and bias 0 is
Cx / std(x) with C the mean-centering: an orthogonal Q with Q1 = 1 commutes with C, so with it. Folding
w * y + b into a reader W (bias c) gives W diag(w) y + (W b + c): the reader must have a bias where b is not 0, must
not be tied to a tensor the fold must leave alone (the embeddings), and the norm's output must go into readers only
(post-LN models add it to the residual, where no layer could absorb the gain).
"""

from __future__ import annotations

import torch
from torch import nn

from .base import eval_mode
from .spec import PermutationSpec
from .tracing.export import traceable_call
from .tracing.invariance import _run
from .transforms import Fold


def owner(key: str) -> str:
    return key.rsplit(".", 1)[0] if "." in key else ""


def norms_on(model: nn.Module, spec: PermutationSpec, group: str) -> dict[str, nn.Module]:
    """Norm modules whose parameters a group carries (module name -> module)."""
    out = {}
    for key, _ in spec[group].axes:
        name = owner(key)
        module = model.get_submodule(name) if name else model
        if "Norm" in type(module).__name__:
            out[name] = module
    return out


def is_rms(module: nn.Module) -> bool:
    return "RMSNorm" in type(module).__name__


def is_layer_norm(module: nn.Module) -> bool:
    return isinstance(module, nn.LayerNorm) or (type(module).__name__.endswith("LayerNorm") and not is_rms(module))


def stream_groups(model: nn.Module, spec: PermutationSpec) -> list[str]:
    """The unblocked groups that pass a norm: a transformer's residual stream."""
    return [g.name for g in spec.groups if g.blocks == 1 and norms_on(model, spec, g.name)]


def _read_by(model: nn.Module, norms, entries) -> dict[str, list[str]]:
    """norm -> the modules of `entries` whose input is that norm's output, seen on one forward pass of example
    tokens (a slice of the output, as an LM head takes, reads it too: the same storage)."""
    outputs, inputs, hooks = {}, {}, []

    def seen(store, name, value) -> None:  # a hook that returns something would replace the module's output
        store.setdefault(name, value)

    for name, module in model.named_modules():
        if name in norms:
            hooks.append(module.register_forward_hook(lambda m, i, o, n=name: seen(outputs, n, o)))
        elif name in entries:
            hooks.append(module.register_forward_hook(lambda m, i, o, n=name: seen(inputs, n, i[0] if i else None)))
    call, args = traceable_call(model, None)
    try:
        with torch.no_grad(), eval_mode(model):
            call(*args)
    finally:
        for h in hooks:
            h.remove()
    storage = lambda t: t.untyped_storage().data_ptr()  # noqa: E731
    return {
        n: [m for m, x in inputs.items() if torch.is_tensor(x) and storage(x) == storage(out)]
        for n, out in outputs.items()
    }


def find_folds(model: nn.Module, spec: PermutationSpec, streams: list[str]) -> tuple[Fold, ...]:
    """For each norm of a stream, the stream's weights whose module reads the norm's output; a ValueError in one line
    naming the norm where a reader's weight is tied to another tensor or a nonzero bias has no reader bias to go."""
    entries = {owner(k): (k, a) for g in streams for k, a in spec[g].axes if k.endswith(".weight")}
    norms = {n: m for g in streams for n, m in norms_on(model, spec, g).items()}
    state = model.state_dict()
    folds = []
    for norm, modules in _read_by(model, norms, entries).items():
        readers = tuple(entries[m] for m in modules)
        if not readers:
            raise ValueError(f"symmetry 'orthogonal': {norm}'s output goes into no linear layer whose gain could fold")
        gain, bias = state.get(f"{norm}.weight"), state.get(f"{norm}.bias")
        moves = (gain is not None and not torch.all(gain == 1)) or (bias is not None and bool(bias.any()))
        for key, _ in readers:
            ties = [k for k, t in state.items() if k != key and t.data_ptr() == state[key].data_ptr()]
            if ties and moves:
                raise ValueError(
                    f"symmetry 'orthogonal' is refused: {norm}'s gain cannot fold into {key}, which is tied to "
                    f"{ties[0]}; untie them, or keep permutations (or signs) on the stream"
                )
            if bias is not None and bias.any() and f"{owner(key)}.bias" not in state:
                raise ValueError(
                    f"symmetry 'orthogonal' is refused: {norm}'s bias cannot fold into {owner(key)}, which has no "
                    "bias; keep permutations on the stream"
                )
        folds.append(Fold(f"{norm}.weight", readers, f"{norm}.bias" if bias is not None else None))
    return tuple(folds)


class FunctionCheck:
    """Whether a state dict computes the model's function on a few example tokens (float32, relative 1e-4)."""

    def __init__(self, model: nn.Module):
        self.call, self.inputs = traceable_call(model, None)
        self.state = dict(model.state_dict())
        with torch.no_grad(), eval_mode(model):
            self.reference = _run(self.call, self.state, self.inputs)
        self.model = model

    def holds(self, state) -> bool:
        with torch.no_grad(), eval_mode(self.model):
            out = _run(self.call, state, self.inputs)
        return all((a - b).abs().max() <= 1e-4 * max(a.abs().max().item(), 1e-6) for a, b in zip(self.reference, out))
