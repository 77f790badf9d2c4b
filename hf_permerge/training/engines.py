"""Training engines: N nets of one architecture stacked into batched ops, or one module per net.

Both take one optimiser step per net per call to `step`, each net on its own batch. AdamW and
SGD act elementwise, so one optimiser over stacked parameters equals N independent ones.

What the speed comes from (measured in `benchmarks/`, reported in BENCHMARKS.md):
- fused optimisers (`fused=True`, CPU and CUDA): one kernel per parameter tensor and step instead
  of about ten elementwise passes;
- the stacked engine's MLP forward is explicit batched matmuls (`torch.bmm`), with activations laid
  out (net, unit, example) so that each weight gradient comes out in the weight's own layout
  (the (net, example, unit) layout made autograd copy every weight gradient once per step);
- on the CPU, that MLP step computes its gradients by hand into buffers kept from step to step
  (`bmm_mlp_step_grads`): autograd's fresh weight-sized gradients cost tens of thousands of page faults
  a step for wide stacks;
- other architectures run `vmap(functional_call)` on a GPU (convolutions become one grouped
  convolution); on the CPU, where grouped convolutions were measured slower than separate ones, conv
  nets train one module per net (`PerNetEngine`), in channels-last layout;
- on CUDA (`cuda_graph`, the trainer's default there), the whole step (forward, backward, optimiser)
  is captured once as a CUDA graph and replayed: small nets are bound by the per-step cost of Python
  and kernel launches, not by arithmetic (an H200 took 2-3 ms per step of twelve 2x32 or twelve
  2x1024 MLPs alike; captured, a Fig. 2 stack of twelve width-32 nets trained 5 epochs in 1.3 s, not 7 s).
"""

from __future__ import annotations

import warnings
from contextlib import contextmanager, nullcontext

import torch
from torch.func import functional_call

from ..models import PermMLPForImageClassification, modeling_perm_mlp
from ..models.modeling_perm_mlp import mlp_forward
from ..precision import tf32_matmuls
from .checkpoints import optimizer_state_from_tensors, optimizer_state_to_tensors
from .seeds import step_seed

FORWARDS = ("auto", "bmm", "vmap", "loop")
GRAPH_WARMUP_STEPS = 3
"""Eager steps before a CUDA graph is captured (PyTorch's recipe: warm up on a side stream)."""


def make_optimizer(params, tc, capturable: bool = False):
    """AdamW or SGD with PyTorch's defaults and fused kernels (one kernel per parameter tensor).

    `capturable` (for CUDA graphs): AdamW stays fused, with its step counts on the device (an H200,
    12 nets: as fast as eager fused steps, where the multi-tensor kernels took 1.6x as long); SGD
    takes the multi-tensor kernels."""
    params = list(params)
    fused = all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in params)
    if tc.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=tc.lr, weight_decay=tc.weight_decay, fused=fused, capturable=capturable)
    kernels = {"foreach": True} if capturable else {"fused": fused}
    return torch.optim.SGD(params, lr=tc.lr, momentum=tc.momentum, weight_decay=tc.weight_decay, **kernels)


def _autocast(device: torch.device, precision: str, cache: bool = True):
    """bf16 autocast when asked; `cache=False` inside a CUDA graph capture (a cached cast would be
    replayed stale)."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16", cache_enabled=cache)


@torch.no_grad()
def eval_loss_acc(forward, x, y, loss_fn, chunk: int):
    """Mean loss and accuracy over a split, in chunks, with one host sync at the end."""
    loss_sum = torch.zeros((), device=x.device)
    correct = torch.zeros((), device=x.device, dtype=torch.long)
    for s in range(0, len(y), chunk):
        logits = forward(x[s : s + chunk]).float()
        loss_sum += loss_fn(logits, y[s : s + chunk]) * len(y[s : s + chunk])
        correct += (logits.argmax(-1) == y[s : s + chunk]).sum()
    return (loss_sum / len(y)).item(), correct.item() / len(y)


LM_EVAL_TOKENS = 16384
"""Tokens per forward when a language model is evaluated (its logits: this many times the vocabulary, in float32)."""


def is_causal_lm(model) -> bool:
    """A transformers language model (it reads `input_ids`), not one of our image classifiers."""
    return getattr(model, "main_input_name", None) == "input_ids"


@torch.no_grad()
def eval_causal_lm(model, input_ids: torch.Tensor, labels: torch.Tensor) -> tuple[float, float]:
    """Mean next-token loss (the model's own, `labels=`) and next-token accuracy over all blocks, exact per token
    (every block predicts the same number of tokens); one host sync at the end."""
    chunk = max(1, LM_EVAL_TOKENS // input_ids.shape[1])
    loss_sum = torch.zeros((), device=input_ids.device)
    correct = torch.zeros((), device=input_ids.device, dtype=torch.long)
    for s in range(0, len(input_ids), chunk):
        x, y = input_ids[s : s + chunk], labels[s : s + chunk]
        out = model(input_ids=x, labels=y)
        loss_sum += out.loss.float() * len(x)
        correct += (out.logits[:, :-1].argmax(-1) == y[:, 1:]).sum()
    return (loss_sum / len(input_ids)).item(), correct.item() / labels[:, 1:].numel()


def image_loss(model):
    """The loss an image classifier trains with, on (logits, labels): ours states it (`compute_loss`); a transformers
    classifier's, with labels, is cross entropy (its config's problem_type single_label_classification)."""
    return getattr(model, "compute_loss", torch.nn.functional.cross_entropy)


def is_ours(model) -> bool:
    """One of our image classifiers (PermMLP, PermCNN), which the stacked engine can stack."""
    return hasattr(model, "example_losses")


def evaluate_model(model, x: torch.Tensor, y: torch.Tensor, chunk: int = 10000) -> tuple[float, float]:
    """(loss, accuracy) of one model on a whole split (x, y) as its forward takes them: images and labels, or a
    language model's blocks and their labels (the blocks; accuracy of the next token)."""
    if is_causal_lm(model):
        return eval_causal_lm(model, x, y)
    return eval_loss_acc(lambda b: model(pixel_values=b, return_dict=False)[0], x, y, image_loss(model), chunk)


@contextmanager
def _seeded(seed: int, device: torch.device):
    """torch's generators (the CPU's, and the device's) seeded with `seed` inside, as they were outside."""
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        yield


def prefers_channels_last(model, device) -> bool:
    """Conv nets on the CPU: oneDNN's convolutions in channels-last layout (weights and inputs) ran a
    32-32-avg-64-64 training step 1.3x and its forward 1.2x faster than in the default layout (BENCHMARKS.md)."""
    return torch.device(device).type == "cpu" and any(isinstance(m, torch.nn.Conv2d) for m in model.modules())


def as_layout(x: torch.Tensor, channels_last: bool) -> torch.Tensor:
    """Images in the layout the engine's convolutions run fastest in (a no-op unless `channels_last`)."""
    return x.contiguous(memory_format=torch.channels_last) if channels_last and x.ndim == 4 else x


class PerNetEngine:
    """One ordinary module and optimiser per net: works for every architecture (BatchNorm, dropout included).
    Conv nets on the CPU train in channels-last layout (`prefers_channels_last`): the same arithmetic, in
    another order (float rounding differs).

    `random_seeds` (one per net): what a net's forward draws at step `step_index` (dropout) comes from torch's
    generators seeded with `step_seed(its seed, step_index)`, put back afterwards; so a net's draws depend on its own
    seed and the step only, not on the nets beside it or on where a resumed run started. None: the generators
    as they are."""

    name = "per_net"

    def __init__(self, models, tc, device, random_seeds: list[int] | None = None):
        device = torch.device(device)
        self.random_seeds = random_seeds
        self.step_index = 0
        self.channels_last = prefers_channels_last(models[0], device)
        layout = torch.channels_last if self.channels_last else torch.contiguous_format
        self.models = [m.to(device, memory_format=layout).train() for m in models]
        self.optimizers = [make_optimizer(m.parameters(), tc) for m in self.models]
        self.precision = tc.precision
        self.device = device
        self.paused: set[int] = set()
        """Nets that no longer train or evaluate (stopped by `training.stop_when_flat`): loss 0, evaluation nan."""

    def step(self, xs: torch.Tensor, ys: torch.Tensor) -> torch.Tensor:
        """One optimiser step per net; xs (N, B, ...) and ys (N, B) hold each net's own batch."""
        losses = []
        for k, (model, opt, x, y) in enumerate(zip(self.models, self.optimizers, xs, ys)):
            if k in self.paused:
                losses.append(torch.zeros((), device=self.device))
                continue
            x = as_layout(x, self.channels_last)
            with self._own_draws(k), tf32_matmuls(self.precision):
                with _autocast(self.device, self.precision):
                    loss = model(**{model.main_input_name: x}, labels=y, return_dict=False)[0]
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
            losses.append(loss.detach())
        self.step_index += 1
        return torch.stack(losses)

    def _own_draws(self, k: int):
        if self.random_seeds is None:
            return nullcontext()
        return _seeded(step_seed(self.random_seeds[k], self.step_index), self.device)

    def set_lr(self, lr: float) -> None:
        for optimizer in self.optimizers:
            for group in optimizer.param_groups:
                group["lr"] = lr

    def export(self, i: int):
        return self.models[i]

    def optimizer_state(self, i: int):
        return optimizer_state_to_tensors(self.optimizers[i].state_dict())

    def load_optimizer_state(self, i: int, tensors, meta) -> None:
        """Net i's optimiser state, each tensor laid out as its parameter is: a fused step walks a parameter and
        its momenta element by element in memory, so a channels-last weight needs channels-last momenta."""
        optimizer = self.optimizers[i]
        optimizer.load_state_dict(optimizer_state_from_tensors(tensors, meta))
        for p, state in optimizer.state.items():
            for k, v in state.items():
                if torch.is_tensor(v) and v.shape == p.shape and v.stride() != p.stride():
                    state[k] = torch.empty_like(p).copy_(v)

    def evaluate(self, x, y, chunk=10000):
        out = []
        for k, m in enumerate(self.models):
            if k in self.paused:
                out.append((float("nan"), float("nan")))
                continue
            m.eval()
            if is_causal_lm(m):
                out.append(eval_causal_lm(m, x, y))
            else:
                out.append(
                    eval_loss_acc(
                        lambda b, m=m: m(pixel_values=as_layout(b, self.channels_last), return_dict=False)[0],
                        x,
                        y,
                        image_loss(m),
                        chunk,
                    )
                )
            m.train()
        return out


# -- forwards of N stacked nets: (params {name: (N, ...)}, x (N, B, ...)) -> logits (N, B, classes) --------


def mlp_layer_names(template) -> list[str] | None:
    """The linear layers of a PermMLP in order, or None when `template` is not one."""
    if type(template) is not PermMLPForImageClassification:
        return None
    return modeling_perm_mlp.mlp_layer_names(template.config.depth)


def bmm_mlp_logits(params: dict, x: torch.Tensor, names: list[str], inputs: list | None = None) -> torch.Tensor:
    """The model's forward (`mlp_forward`) with each layer a batched matmul over the N nets, activations kept
    (N, units, B); `inputs`, when given, receives each layer's input (what a hand-written backward needs)."""

    def linear(name, h):
        w, b = params[f"{name}.weight"], params.get(f"{name}.bias")
        if inputs is not None:
            inputs.append(h)
        return torch.bmm(w, h) if b is None else torch.baddbmm(b.unsqueeze(-1), w, h)

    in_place = not torch.is_grad_enabled()  # in place where autograd keeps no graph
    h = x.flatten(2).transpose(1, 2)
    return mlp_forward(linear, lambda i, h: h.relu_() if in_place else h.relu(), names, h).transpose(1, 2)


@torch.no_grad()
def bmm_mlp_step_grads(params: dict, x: torch.Tensor, names: list[str], losses_of) -> torch.Tensor:
    """`bmm_mlp_logits`'s forward and backward by hand, each gradient written into its parameter's `.grad`
    (made on the first step and kept: no new weight-sized tensor per step); returns the (N,) losses. `losses_of(logits)` gives them
    from (N, B, classes) logits, differentiated by autograd (the small part).

    Why (2-core CPU, 12 stacked 2x2048 MLPs): autograd allocates every weight gradient afresh, 275 MB a step.
    Blocks that large come from glibc as new pages each time (its mmap threshold stops at 32 MB), so each
    step took 71,000 page faults, and the stacked engine ran at 51 ms per net and step against 34 ms for
    nets trained one by one (whose 16 MB gradients are reused from the heap)."""
    inputs: list = []
    logits = bmm_mlp_logits(params, x, names, inputs).requires_grad_()
    with torch.enable_grad():
        losses = losses_of(logits)
        (grad,) = torch.autograd.grad(losses.sum(), logits)
    for p in params.values():
        if p.grad is None:  # the first step, or after optimizer.zero_grad(): made once
            p.grad = torch.empty_like(p)
    g = grad.transpose(1, 2)  # (N, classes, B)
    for k in reversed(range(len(names))):
        w, b = params[f"{names[k]}.weight"], params.get(f"{names[k]}.bias")
        torch.bmm(g, inputs[k].transpose(1, 2), out=w.grad)
        if b is not None:
            torch.sum(g, dim=2, out=b.grad)
        if k:  # through the ReLU: zero where its output was zero
            g = torch.bmm(w.transpose(1, 2), g).masked_fill_(inputs[k] <= 0, 0.0)
    return losses.detach()


def _one_logits(template, params, x):
    return functional_call(template, params, (x,), {"return_dict": False})[0]


def vmap_logits(template, params: dict, x: torch.Tensor) -> torch.Tensor:
    return torch.vmap(lambda p, xi: _one_logits(template, p, xi))(params, x)


def loop_logits(template, params: dict, x: torch.Tensor) -> torch.Tensor:
    slices = zip(*(p.unbind(0) for p in params.values()))  # unbind: backward stacks the grads once
    return torch.stack([_one_logits(template, dict(zip(params, s)), xi) for s, xi in zip(slices, x.unbind(0))])


class StackedEngine:
    """N nets as one set of stacked parameters (leading axis: the net), one optimiser over them.

    `forward`: "bmm" (PermMLP only: batched matmuls), "vmap" (`vmap(functional_call)`, any
    architecture), "loop" (one `functional_call` per net on its slice of the stacked parameters);
    "auto": bmm for PermMLP, else vmap on CUDA and loop elsewhere. All give the same numbers up to
    float rounding. `compile`: run the forward through `torch.compile` (measured: no gain on the
    CPU, so off by default and not a config setting). `cuda_graph` (CUDA only, ignored elsewhere):
    replay a captured step, see `step`. Buffers (none without BatchNorm) are not supported:
    BatchNorm nets use `PerNetEngine`.
    """

    name = "stacked"

    def __init__(self, models, tc, device, forward: str = "auto", compile: bool = False, cuda_graph: bool = False):
        if not is_ours(models[0]):
            raise ValueError(
                f"the stacked engine stacks the MLP and CNN, not {type(models[0]).__name__}; use training.engine=per_net"
            )
        if any(True for m in models for _ in m.buffers()):
            raise ValueError(
                "the stacked engine does not support models with buffers (BatchNorm); use training.engine=per_net"
            )
        if forward not in FORWARDS:
            raise ValueError(f"forward must be one of {FORWARDS}, got {forward!r}")
        device = torch.device(device)
        self.template = models[0].to(device)
        self.models = models
        names = [n for n, _ in models[0].named_parameters()]
        self.params = {
            n: torch.stack([dict(m.named_parameters())[n].detach().to(device) for m in models]).requires_grad_(True)
            for n in names
        }
        self.cuda_graph = bool(cuda_graph) and device.type == "cuda"
        self.optimizer = make_optimizer(list(self.params.values()), tc, capturable=self.cuda_graph)
        self.precision = tc.precision
        self.device = device
        self._graph = None  # (CUDAGraph, static inputs, static labels, static losses) once captured
        self.step_index = 0  # the run's steps so far; unused here (the stacked nets draw nothing at random)
        self._eager_steps = 0
        layers = mlp_layer_names(self.template)
        if forward == "auto":
            forward = "bmm" if layers else "vmap" if device.type == "cuda" else "loop"
        if forward == "bmm" and not layers:
            raise ValueError(
                f"forward='bmm' is written for PermMLP; use 'vmap' or 'loop' for {type(self.template).__name__}"
            )
        self.forward = forward
        # the CPU's fp32 MLP steps compute their gradients by hand, into buffers kept from step to step
        self.grads_by_hand = (
            forward == "bmm" and device.type == "cpu" and self.precision in ("fp32", "tf32") and not compile
        )  # tf32 is fp32 on the CPU
        self._layers = layers
        self._logits_fn = {
            "bmm": lambda p, x: bmm_mlp_logits(p, x, layers),
            "vmap": lambda p, x: vmap_logits(self.template, p, x),
            "loop": lambda p, x: loop_logits(self.template, p, x),
        }[forward]
        if compile:
            self._logits_fn = torch.compile(self._logits_fn)

    def losses(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """(N,) mean loss per net of (N, B, classes) logits: one batched call, no vmap."""
        return self.template.example_losses(logits, labels).mean(1)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """(N, B, classes) logits of the N nets on their inputs x (N, B, ...)."""
        return self._logits_fn(self.params, x)

    def step(self, xs: torch.Tensor, ys: torch.Tensor) -> torch.Tensor:
        """One step of every net; xs (N, B, ...) and ys (N, B) hold each net's own batch.

        With `cuda_graph`, the first `GRAPH_WARMUP_STEPS` steps run eagerly on a side stream (the
        optimiser state is created there, as capture requires), the next one is captured, and every
        later one copies its batch into the graph's inputs and replays it. Every call is one real
        step of training; the batch shape must stay the same (the trainer's batches do)."""
        if not self.cuda_graph:
            return self._step(xs, ys)
        if self._graph is None:
            return self._warm_up_or_capture(xs, ys)
        graph, static_x, static_y, static_losses = self._graph
        if xs.shape != static_x.shape or ys.shape != static_y.shape:
            raise ValueError(f"a captured step takes batches of shape {tuple(static_x.shape)}, got {tuple(xs.shape)}")
        static_x.copy_(xs)
        static_y.copy_(ys)
        graph.replay()
        return static_losses.clone()

    def _step(self, xs: torch.Tensor, ys: torch.Tensor, zero_grad: bool = True) -> torch.Tensor:
        """Forward, backward, optimiser step. In a CUDA graph (zero_grad=False) each replay's backward
        overwrites the gradients that the capture allocated, so there is nothing to zero."""
        if self.grads_by_hand:
            losses = bmm_mlp_step_grads(self.params, xs, self._layers, lambda logits: self.losses(logits, ys))
            self.optimizer.step()
            return losses
        with tf32_matmuls(self.precision):
            with _autocast(self.device, self.precision, cache=not self.cuda_graph):
                logits = self.logits(xs)
            # bf16 logits go up to float32 for the loss; float64 nets (a numerics check) stay float64
            losses = self.losses(logits if logits.dtype == torch.float64 else logits.float(), ys)
            if zero_grad:
                self.optimizer.zero_grad(set_to_none=True)
            losses.sum().backward()
            self.optimizer.step()
        return losses.detach()

    def _warm_up_or_capture(self, xs: torch.Tensor, ys: torch.Tensor) -> torch.Tensor:
        current = torch.cuda.current_stream(self.device)
        if self._eager_steps < GRAPH_WARMUP_STEPS:
            side = torch.cuda.Stream(self.device)
            side.wait_stream(current)
            with torch.cuda.stream(side), warnings.catch_warnings():
                # AdamW(capturable=True) warns when it runs outside a capture: here it must, to warm up
                warnings.filterwarnings("ignore", message=".*capturable=True.*")
                losses = self._step(xs, ys)
            current.wait_stream(side)
            self._eager_steps += 1
            return losses
        static_x, static_y = xs.clone(), ys.clone()
        self.optimizer.zero_grad(set_to_none=True)  # backward in the graph then writes fresh gradients
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_losses = self._step(static_x, static_y, zero_grad=False)
        self._graph = (graph, static_x, static_y, static_losses)
        graph.replay()  # capturing records the step without running it
        return static_losses.clone()

    def set_lr(self, lr: float) -> None:
        """The learning rate of the next steps (not under a captured CUDA graph, which keeps the one it captured)."""
        if self._graph is not None:
            raise RuntimeError("a captured CUDA graph keeps its learning rate; train with cuda_graph=False")
        for group in self.optimizer.param_groups:
            group["lr"] = lr

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
    def evaluate(self, x, y, chunk=1000):
        """[(loss, acc)] per net on a split shared by all nets; one host sync at the end."""
        n = len(self.models)
        loss_sum = torch.zeros(n, device=x.device)
        correct = torch.zeros(n, device=x.device, dtype=torch.long)
        for s in range(0, len(y), chunk):
            xx, yy = x[s : s + chunk], y[s : s + chunk]
            logits = self.logits(xx.expand(n, *xx.shape)).float()
            loss_sum += self.losses(logits, yy.expand(n, *yy.shape)) * len(yy)
            correct += (logits.argmax(-1) == yy).sum(-1)
        return [(loss, c / len(y)) for loss, c in zip((loss_sum / len(y)).tolist(), correct.tolist())]


def make_engine(kind: str, models, tc, device, random_seeds: list[int] | None = None, **options):
    """`random_seeds` go to the per-net engine (the stacked engine's nets draw nothing at random); `options` to the
    stacked engine (`forward`, `compile`, `cuda_graph`)."""
    if (
        kind == "auto"
    ):  # transformers models, BatchNorm buffers, or conv nets on the CPU (a loop over the nets either way)
        per_net = (
            not is_ours(models[0])
            or any(True for m in models for _ in m.buffers())
            or prefers_channels_last(models[0], device)
        )
        kind = "per_net" if per_net else "stacked"
    if kind == "per_net":
        return PerNetEngine(models, tc, device, random_seeds)
    return StackedEngine(models, tc, device, **options)
