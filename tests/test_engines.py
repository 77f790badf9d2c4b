"""The fast paths compute what the plain ones compute: stacked forwards, fused optimisers, overlapped solves."""

from types import SimpleNamespace

import pytest
import torch
from objectives import activation_objective, assert_equally_good

from hf_permerge.alignment.activation import ActivationMatcher
from hf_permerge.data.tensors import load_tensors
from hf_permerge.models import (
    PermCNNConfig,
    PermCNNForImageClassification,
    PermMLPConfig,
    PermMLPForImageClassification,
)
from hf_permerge.training.engines import StackedEngine, make_engine, make_optimizer

CPU = torch.device("cpu")


def tc(optimizer="adamw", precision="fp32"):
    return SimpleNamespace(
        optimizer=optimizer,
        lr=1e-3 if optimizer == "adamw" else 0.05,
        weight_decay=1e-2,
        momentum=0.9,
        precision=precision,
    )


NETS = {
    "mlp": lambda s: PermMLPForImageClassification(PermMLPConfig(depth=2, width=24, seed=s)),
    "mlp_bias": lambda s: PermMLPForImageClassification(PermMLPConfig(depth=1, width=16, bias=True, seed=s)),
    "mlp_mse": lambda s: PermMLPForImageClassification(PermMLPConfig(depth=1, width=16, loss="mse", seed=s)),
    "cnn": lambda s: PermCNNForImageClassification(PermCNNConfig(layers="4-avg-8", seed=s)),
}
FORWARDS = {
    "mlp": ("bmm", "vmap", "loop"),
    "mlp_bias": ("bmm", "vmap", "loop"),
    "mlp_mse": ("bmm", "loop"),
    "cnn": ("vmap", "loop"),
}
CASES = [(name, fwd) for name, fwds in FORWARDS.items() for fwd in fwds]


@pytest.fixture(scope="module")
def data(tiny_fmnist):
    return load_tensors("fashion_mnist", "train", "cpu", tiny_fmnist)


def batches(data, num_nets, step, size=50):
    """A different batch for each net, as the trainer gives them (each net its own data order)."""
    g = torch.Generator().manual_seed(step)
    idx = torch.stack([torch.randperm(len(data), generator=g)[:size] for _ in range(num_nets)])
    return data.batches(idx)


@pytest.mark.parametrize("name,forward", CASES)
def test_stacked_forward_equals_each_nets_own_forward(name, forward, data):
    models = [NETS[name](s) for s in range(3)]
    engine = StackedEngine(models, tc(), CPU, forward=forward)
    xs, _ = batches(data, 3, 0)
    with torch.no_grad():
        got = engine.logits(xs)
        for i, (m, x) in enumerate(zip(models, xs)):
            torch.testing.assert_close(got[i], m(pixel_values=x).logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
@pytest.mark.parametrize("name,forward", CASES)
def test_stacked_training_equals_per_net_training(name, forward, optimizer, data):
    """One optimiser over stacked parameters == one per net (AdamW and SGD are elementwise), per forward."""
    stacked = make_engine("stacked", [NETS[name](s) for s in range(3)], tc(optimizer), CPU, forward=forward)
    per_net = make_engine("per_net", [NETS[name](s) for s in range(3)], tc(optimizer), CPU)
    for step in range(8):
        xs, ys = batches(data, 3, step)
        torch.testing.assert_close(stacked.step(xs, ys), per_net.step(xs, ys), rtol=1e-4, atol=1e-5)
    for i in range(3):
        a, b = stacked.export(i).state_dict(), per_net.export(i).state_dict()
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=0, atol=2e-5)
    x, y = data.pixel_values[:200], data.labels[:200]
    for (la, aa), (lb, ab) in zip(stacked.evaluate(x, y, chunk=64), per_net.evaluate(x, y)):
        assert la == pytest.approx(lb, abs=1e-5) and aa == pytest.approx(ab, abs=1e-9)


def test_auto_forward_is_bmm_for_mlps_and_a_loop_for_cnns_on_the_cpu():
    assert StackedEngine([NETS["mlp"](0)], tc(), CPU).forward == "bmm"
    assert StackedEngine([NETS["cnn"](0)], tc(), CPU).forward == "loop"
    with pytest.raises(ValueError, match="PermMLP"):
        StackedEngine([NETS["cnn"](0)], tc(), CPU, forward="bmm")
    with pytest.raises(ValueError, match="forward must be one of"):
        StackedEngine([NETS["mlp"](0)], tc(), CPU, forward="fast")


def test_stacked_weight_gradients_need_no_layout_copy(data):
    """The bmm forward gives each weight gradient in the weight's own (contiguous) layout."""
    engine = StackedEngine([NETS["mlp"](s) for s in range(2)], tc(), CPU)
    xs, ys = batches(data, 2, 0)
    engine.losses(engine.logits(xs), ys).sum().backward()
    assert all(p.grad.is_contiguous() for p in engine.params.values())


@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
def test_fused_optimiser_follows_the_textbook_update(optimizer):
    """make_optimizer's fused kernel takes the same steps as PyTorch's plain for-loop implementation."""
    torch.manual_seed(0)
    w = torch.randn(37, 11)
    ours, plain = w.clone().requires_grad_(), w.clone().requires_grad_()
    opt = make_optimizer([ours], tc(optimizer))
    assert opt.defaults["fused"]
    cfg = tc(optimizer)
    ref = (
        torch.optim.AdamW([plain], lr=cfg.lr, weight_decay=cfg.weight_decay, foreach=False)
        if optimizer == "adamw"
        else torch.optim.SGD([plain], lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, foreach=False)
    )
    for step in range(20):
        g = torch.randn(37, 11, generator=torch.Generator().manual_seed(step))
        ours.grad, plain.grad = g.clone(), g.clone()
        opt.step()
        ref.step()
    torch.testing.assert_close(ours, plain, rtol=1e-5, atol=1e-6)


def test_stacked_optimizer_state_round_trips_per_net(data):
    """Net i's optimiser slice saved from one engine and loaded into another continues identically."""
    a = make_engine("stacked", [NETS["mlp"](s) for s in range(2)], tc(), CPU)
    for step in range(3):
        a.step(*batches(data, 2, step))
    b = make_engine("stacked", [NETS["mlp"](s) for s in range(2)], tc(), CPU)
    with torch.no_grad():
        for n in a.params:
            b.params[n].copy_(a.params[n])
    for i in range(2):
        b.load_optimizer_state(i, *a.optimizer_state(i))
    xs, ys = batches(data, 2, 3)
    torch.testing.assert_close(a.step(xs, ys), b.step(xs, ys), rtol=0, atol=0)
    for n in a.params:
        torch.testing.assert_close(a.params[n], b.params[n], rtol=0, atol=0)


def test_bf16_option_trains_close_to_fp32(data):
    """bf16 autocast is an option, not the default: it runs and stays near the fp32 losses."""
    fp32 = make_engine("stacked", [NETS["mlp"](s) for s in range(2)], tc(), CPU)
    bf16 = make_engine("stacked", [NETS["mlp"](s) for s in range(2)], tc(precision="bf16"), CPU)
    for step in range(3):
        xs, ys = batches(data, 2, step)
        l32, l16 = fp32.step(xs, ys), bf16.step(xs, ys)
        assert l16.dtype == torch.float32 and torch.isfinite(l16).all()
        torch.testing.assert_close(l16, l32, rtol=0.05, atol=0.05)


@pytest.mark.parametrize("kind", ["stacked", "per_net"])
def test_tf32_option_is_fp32_on_the_cpu_and_restores_the_setting(kind, data):
    """tf32 only switches CUDA matmuls to tensor cores, for the step alone: on the CPU the same numbers."""
    fp32 = make_engine(kind, [NETS["mlp"](s) for s in range(2)], tc(), CPU)
    tf32 = make_engine(kind, [NETS["mlp"](s) for s in range(2)], tc(precision="tf32"), CPU)
    before = torch.backends.cuda.matmul.allow_tf32
    for step in range(3):
        xs, ys = batches(data, 2, step)
        torch.testing.assert_close(tf32.step(xs, ys), fp32.step(xs, ys), rtol=0, atol=0)
        assert torch.backends.cuda.matmul.allow_tf32 == before


def test_cuda_graph_option_is_ignored_off_cuda(data):
    """On the CPU `cuda_graph` changes nothing: the same fused optimiser, the same steps."""
    plain = make_engine("stacked", [NETS["mlp"](s) for s in range(2)], tc(), CPU)
    graphed = make_engine("stacked", [NETS["mlp"](s) for s in range(2)], tc(), CPU, cuda_graph=True)
    assert not graphed.cuda_graph and graphed.optimizer.defaults["fused"]
    for step in range(5):
        xs, ys = batches(data, 2, step)
        torch.testing.assert_close(graphed.step(xs, ys), plain.step(xs, ys), rtol=0, atol=0)


needs_cuda = pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs CUDA; benchmarks/gpu_session.sh runs it on the lent GPU"
)


@needs_cuda
@pytest.mark.parametrize("precision", ["fp32", "tf32", "bf16"])
@pytest.mark.parametrize("name,optimizer", [("mlp", "adamw"), ("mlp", "sgd"), ("mlp_mse", "adamw"), ("cnn", "adamw")])
def test_cuda_graph_steps_equal_eager_steps(name, optimizer, precision, data):
    """Warm-up, capture and replays train exactly what eager steps train (the graph replays the same
    kernels: the step counts of AdamW's bias correction live on the device and advance in each replay)."""
    cuda = torch.device("cuda")
    eager = make_engine("stacked", [NETS[name](s) for s in range(3)], tc(optimizer, precision), cuda)
    graphed = make_engine("stacked", [NETS[name](s) for s in range(3)], tc(optimizer, precision), cuda, cuda_graph=True)
    assert graphed.cuda_graph
    tol = {
        "fp32": {"rtol": 1e-4, "atol": 1e-5},
        "tf32": {"rtol": 1e-3, "atol": 1e-4},
        "bf16": {"rtol": 2e-2, "atol": 2e-3},
    }[precision]
    for step in range(10):  # 3 warm-up steps, the capture, 6 replays
        xs, ys = (t.to(cuda) for t in batches(data, 3, step))
        torch.testing.assert_close(graphed.step(xs, ys), eager.step(xs, ys), **tol)
    assert graphed._graph is not None
    for n in eager.params:
        torch.testing.assert_close(graphed.params[n], eager.params[n], **tol)
    with pytest.raises(ValueError, match="batches of shape"):
        graphed.step(*(t.to(cuda) for t in batches(data, 3, 9, size=20)))


def test_match_many_equals_one_match_per_net(data):
    """Overlapping net i's Hungarian solves with net i+1's statistics changes no result: the same similarities
    and an equally good matching (the permutations may differ only where units tie)."""
    ref, others = NETS["mlp"](0), [NETS["mlp"](s) for s in (1, 2, 3)]
    matcher = ActivationMatcher(num_examples=300)
    together = matcher.match_many(ref, others, data)
    for perms, other in zip(together, others):
        alone = matcher.match(ref, other, data)
        for g, values in alone.info["groups"].items():
            assert perms.info["groups"][g] == pytest.approx(values, rel=1e-6)
        assert_equally_good(
            activation_objective(ref, other, perms, data, num_examples=300),
            activation_objective(ref, other, alone, data, num_examples=300),
        )


@pytest.mark.parametrize("name", ["mlp", "mlp_bias", "mlp_mse"])
def test_cpu_gradients_by_hand_equal_autograds(name, data):
    """The CPU MLP step's hand-written backward (gradients into kept buffers) gives autograd's gradients."""
    from hf_permerge.training.engines import bmm_mlp_logits, bmm_mlp_step_grads, mlp_layer_names

    engine = StackedEngine([NETS[name](s) for s in range(3)], tc(), CPU)
    assert engine.grads_by_hand
    xs, ys = batches(data, 3, 0)
    names = mlp_layer_names(engine.template)
    losses = bmm_mlp_step_grads(engine.params, xs, names, lambda logits: engine.losses(logits, ys))
    by_hand = {n: p.grad.clone() for n, p in engine.params.items()}
    params = {n: p.detach().clone().requires_grad_() for n, p in engine.params.items()}
    expected = engine.losses(bmm_mlp_logits(params, xs, names), ys)
    expected.sum().backward()
    torch.testing.assert_close(losses, expected.detach())
    for n, p in params.items():
        torch.testing.assert_close(by_hand[n], p.grad, rtol=1e-5, atol=1e-7)


def test_gradients_by_hand_only_where_they_are_written_for():
    """fp32 MLPs on the CPU; bf16 autocast, other architectures and other devices keep autograd."""
    assert not StackedEngine([NETS["mlp"](s) for s in range(2)], tc(precision="bf16"), CPU).grads_by_hand
    assert not StackedEngine([NETS["cnn"](s) for s in range(2)], tc(), CPU).grads_by_hand
    assert not StackedEngine([NETS["mlp"](s) for s in range(2)], tc(), CPU, forward="loop").grads_by_hand


def test_cpu_step_survives_a_zero_grad_that_drops_the_buffers(data):
    engine = StackedEngine([NETS["mlp"](s) for s in range(2)], tc(), CPU)
    before = {n: p.detach().clone() for n, p in engine.params.items()}
    engine.optimizer.zero_grad()  # PyTorch's default: set_to_none=True
    engine.step(*batches(data, 2, 0))
    assert all(not torch.equal(before[n], p) for n, p in engine.params.items())


@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
@pytest.mark.parametrize("name,forward", CASES)
def test_in_float64_both_engines_are_a_plain_pytorch_loop_to_rounding(name, forward, optimizer, data):
    """The engines' logic against the textbook loop (a model, torch.optim, loss.backward() per net) in float64,
    where rounding cannot hide a difference: 30 steps, within 1e-10. (In float32 a net's weights drift from the
    loop's after tens of steps: any other order of float sums does that, and Adam's normalisation amplifies
    it; so the engines give nets of the same distribution, not the same bits, as any two implementations.)"""
    import copy

    import torch.nn.functional as F

    inits = [NETS[name](s).double() for s in range(2)]
    engines = [
        make_engine("stacked", [copy.deepcopy(m) for m in inits], tc(optimizer), CPU, forward=forward),
        make_engine("per_net", [copy.deepcopy(m) for m in inits], tc(optimizer), CPU),
    ]
    loops = [copy.deepcopy(m).train() for m in inits]
    settings = tc(optimizer)
    optimisers = [
        torch.optim.AdamW(m.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
        if optimizer == "adamw"
        else torch.optim.SGD(
            m.parameters(), lr=settings.lr, momentum=settings.momentum, weight_decay=settings.weight_decay
        )
        for m in loops
    ]
    for step in range(30):
        xs, ys = batches(data, 2, step)
        xs = xs.double()
        for engine in engines:
            engine.step(xs, ys)
        for model, opt, x, y in zip(loops, optimisers, xs, ys):
            logits = model(pixel_values=x).logits
            loss = (
                F.mse_loss(logits, F.one_hot(y, 10).double())
                if model.config.loss == "mse"
                else F.cross_entropy(logits, y)
            )
            opt.zero_grad()
            loss.backward()
            opt.step()
    for engine in engines:
        for i, model in enumerate(loops):
            got, want = engine.export(i).state_dict(), model.state_dict()
            for k in want:
                torch.testing.assert_close(got[k], want[k], rtol=0, atol=1e-10)
