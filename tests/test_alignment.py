"""Alignment: permutations leave the function unchanged (App. E), and the matchers find them (Section 2, App. B)."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from objectives import assert_equally_good, objective
from safetensors import safe_open
from safetensors.torch import save_file

from hf_permerge.alignment import (
    ActivationStatistics,
    PermGroup,
    Permutations,
    PermutationSpec,
    activation_statistics,
    get_matcher,
    solve_assignment,
    solve_assignments,
    solve_coupled,
)
from hf_permerge.alignment.permutations import METADATA_KEY
from hf_permerge.data.tensors import TensorSplit, load_tensors, normalise
from hf_permerge.merging.inputs import as_tensor_split
from hf_permerge.models import (
    PermCNNConfig,
    PermCNNForImageClassification,
    PermMLPConfig,
    PermMLPForImageClassification,
)

ACTIVATION_VARIANTS = [
    dict(similarity=s, preactivation=p) for s, p in itertools.product(("cosine", "correlation", "l2"), (False, True))
]


# Nets and data -------------------------------------------------------------------------------------


def mlp(seed=0, depth=2, width=32, bias=True, image_size=28):
    return PermMLPForImageClassification(
        PermMLPConfig(depth=depth, width=width, bias=bias, seed=seed, image_size=image_size)
    ).eval()


def cnn(seed=0, layers="8-8-avg-16", batch_norm=False, bias=True, image_size=28):
    return PermCNNForImageClassification(
        PermCNNConfig(layers=layers, batch_norm=batch_norm, bias=bias, seed=seed, image_size=image_size)
    ).eval()


NETS = {
    "mlp": lambda seed=0: mlp(seed),
    "cnn": lambda seed=0: cnn(seed),
    "cnn_bn": lambda seed=0: randomise_norm(cnn(seed, batch_norm=True), seed),
}


@torch.no_grad()
def randomise_state(model, seed):
    """Random biases and BatchNorm state (at init they are 0 / 1 and would hide a wrong axis)."""
    gen = torch.Generator().manual_seed(seed)
    for name, t in model.state_dict().items():
        if t.is_floating_point() and t.ndim == 1:
            value = torch.randn(t.shape, generator=gen) * 0.3
            t.copy_(value.abs() + 0.5 if name.endswith("running_var") else value)
    return model


@torch.no_grad()
def randomise_norm(model, seed):
    """BatchNorm statistics and affine parameters as after some training, so eval-mode BN is not the identity."""
    gen = torch.Generator().manual_seed(seed + 1000)
    for name, t in model.state_dict().items():
        if ".norm." in name and t.is_floating_point():
            value = torch.rand(t.shape, generator=gen)
            t.copy_(value + 0.5 if name.endswith(("running_var", "weight")) else value - 0.5)
    return model


@pytest.fixture(scope="module")
def data() -> TensorSplit:
    return load_tensors("fashion_mnist", "test").subset(512, seed=0)  # the smaller split loads faster


def briefly_trained(model, data, steps=10, seed=0):
    """A few Adam steps: enough to move the nets off their init, cheap on 2 cores."""
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    model.train()
    for _ in range(steps):
        idx = torch.randint(len(data), (32,), generator=gen)
        loss = model(pixel_values=data.pixel_values[idx], labels=data.labels[idx]).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


@pytest.fixture(scope="module")
def trained_pair(data):
    """Two differently seeded, briefly trained nets per architecture, trained once for the module."""
    cache = {}

    def get(name):
        if name not in cache:
            cache[name] = tuple(briefly_trained(NETS[name](seed), data, seed=seed) for seed in (0, 1))
        return cache[name]

    return get


def logits(model, x):
    with torch.no_grad():
        return model(pixel_values=x).logits


# App. E: permuting hidden units leaves the function unchanged ----------------------------------------

architectures = st.one_of(
    st.builds(
        lambda depth, width, bias: mlp(depth=depth, width=width, bias=bias, image_size=8),
        st.integers(1, 3),
        st.integers(1, 16),
        st.booleans(),
    ),
    st.builds(
        lambda layers, bn, bias: cnn(layers=layers, batch_norm=bn, bias=bias, image_size=8),
        st.sampled_from(["4", "3-5", "4-avg-6", "2-3-avg-4-4", "4-avg-4-avg-8"]),
        st.booleans(),
        st.booleans(),
    ),
)


@settings(max_examples=40, deadline=None)
@given(model=architectures, seed=st.integers(0, 2**16))
def test_permuted_net_computes_same_function(model, seed):
    randomise_state(model, seed)
    spec = model.permutation_spec()
    perms = Permutations.random(spec, seed)
    permuted = perms.apply(model)
    assert type(permuted) is type(model) and not permuted.training
    x = torch.randn(5, 1, 8, 8, generator=torch.Generator().manual_seed(seed))
    expected, got = logits(model, x), logits(permuted, x)
    # relative error, with an absolute floor: a net whose units are all dead outputs exact zeros
    assert (got - expected).norm().item() <= 1e-5 * expected.norm().item() + 1e-6
    if not perms.is_identity():  # the weights did move: the check above is not vacuous
        assert any(not torch.equal(permuted.state_dict()[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("name", NETS)
def test_permuted_net_computes_same_function_on_images(name, data):
    model = randomise_state(NETS[name](), 0)
    permuted = Permutations.random(model.permutation_spec(), seed=1).apply(model)
    x = data.pixel_values[:64]
    expected = logits(model, x)
    assert ((logits(permuted, x) - expected).norm() / expected.norm()).item() < 1e-5


def test_apply_leaves_its_input_unchanged_and_works_on_state_dicts():
    model = randomise_state(mlp(), 0)
    spec = model.permutation_spec()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    perms = Permutations.random(spec, 0)
    permuted_model, permuted_state = perms.apply(model), perms.apply(model.state_dict(), spec)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())
    assert all(torch.equal(permuted_model.state_dict()[k], v) for k, v in permuted_state.items())
    with pytest.raises(ValueError, match="PermutationSpec"):
        perms.apply(model.state_dict())


# The algebra ---------------------------------------------------------------------------------------


@settings(max_examples=30, deadline=None)
@given(sizes=st.lists(st.integers(1, 12), min_size=1, max_size=3), seed=st.integers(0, 2**16))
def test_inverse_and_compose(sizes, seed):
    model = randomise_state(mlp(depth=len(sizes), width=max(sizes), image_size=4), seed)
    spec = model.permutation_spec()
    p, q = Permutations.random(spec, seed), Permutations.random(spec, seed + 1)
    state = model.state_dict()

    def same(x, y):
        return all(torch.equal(x[k], y[k]) for k in x)

    assert same(p.inverse().apply(p.apply(state, spec), spec), state)
    assert same(p.apply(p.inverse().apply(state, spec), spec), state)
    assert same(p.compose(q).apply(state, spec), p.apply(q.apply(state, spec), spec))
    assert p.compose(p.inverse()).is_identity() and p.inverse().compose(p).is_identity()
    assert p.compose(Permutations.identity(spec)) == p == Permutations.identity(spec).compose(p)
    assert same(Permutations.identity(spec).apply(state, spec), state)


def test_compose_refuses_permutations_of_other_groups():
    p = Permutations.identity(mlp(depth=2).permutation_spec())
    with pytest.raises(ValueError, match="different groups"):
        p.compose(Permutations.identity(mlp(depth=3).permutation_spec()))


def test_validate_rejects_a_non_bijection_with_a_clear_message():
    spec = mlp(width=4).permutation_spec()
    Permutations.identity(spec).validate(spec)
    bad = Permutations({"hidden.0": torch.tensor([0, 1, 1, 3]), "hidden.1": torch.arange(4)})
    with pytest.raises(ValueError, match=r"'hidden.0' is not a bijection.*repeated entries \[1\]"):
        bad.validate(spec)
    with pytest.raises(ValueError, match="not a bijection"):
        bad.apply(mlp(width=4))
    with pytest.raises(ValueError, match="has 3 entries but the group has 4 units"):
        Permutations({"hidden.0": torch.arange(3), "hidden.1": torch.arange(4)}).validate(spec)
    with pytest.raises(ValueError, match=r"missing groups \['hidden.1'\]"):
        Permutations({"hidden.0": torch.arange(4)}).validate(spec)
    with pytest.raises(ValueError, match=r"unknown groups \['conv.0'\]"):
        Permutations({"hidden.0": torch.arange(4), "hidden.1": torch.arange(4), "conv.0": torch.arange(4)}).validate(
            spec
        )


def test_save_load_round_trip_keeps_permutations_and_metadata(tmp_path, data):
    a, b = mlp(0), mlp(1)
    perms = get_matcher("activation", num_examples=256).match(a, b, data)
    path = tmp_path / "permutations.safetensors"
    perms.save(path)
    loaded = Permutations.load(path)
    assert loaded == perms and loaded.info == json.loads(json.dumps(perms.info))
    assert loaded.info["matcher"] == "activation"
    assert loaded.info["settings"]["similarity"] == "cosine" and loaded.info["settings"]["num_examples"] == 256
    assert loaded.info["data"] == {"fingerprint": data.subset(256, 0).fingerprint, "num_examples": 256}
    assert set(loaded.info["groups"]["hidden.0"]) == {"similarity_identity", "similarity_matched"}
    with safe_open(str(path), framework="pt") as f:  # the header is plain JSON any reader can parse
        header = json.loads(f.metadata()[METADATA_KEY])
    assert header["group_order"] == ["hidden.0", "hidden.1"] and header["matcher"] == "activation"
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temp file left behind


def test_load_refuses_files_that_are_not_permutations(tmp_path):
    with pytest.raises(FileNotFoundError):
        Permutations.load(tmp_path / "missing.safetensors")
    save_file({"w": torch.zeros(2)}, str(tmp_path / "weights.safetensors"))
    with pytest.raises(ValueError, match="not a permutations file"):
        Permutations.load(tmp_path / "weights.safetensors")
    (tmp_path / "corrupt.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="not a readable safetensors"):
        Permutations.load(tmp_path / "corrupt.safetensors")


# The Hungarian step --------------------------------------------------------------------------------


@settings(max_examples=20, deadline=None)
@given(n=st.integers(1, 5), seed=st.integers(0, 2**16))
def test_assignment_maximises_summed_similarity(n, seed):
    s = torch.randn(n, n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    perm = solve_assignment(s)
    best = max(sum(s[i, j].item() for i, j in enumerate(p)) for p in itertools.permutations(range(n)))
    assert sum(s[i, j].item() for i, j in enumerate(perm.tolist())) == pytest.approx(best)


def test_concurrent_solves_equal_one_by_one():
    gen = torch.Generator().manual_seed(0)
    sims = {f"g{i}": torch.randn(40, 40, generator=gen) for i in range(6)}
    solved = solve_assignments(sims, max_workers=3)
    assert list(solved) == list(sims)
    assert all(torch.equal(solved[g], solve_assignment(s)) for g, s in sims.items())


def test_assignment_refuses_nan():
    for warm_start in ("none", "sinkhorn"):
        with pytest.raises(ValueError, match="NaN"):
            solve_assignment(torch.tensor([[1.0, float("nan")], [0.0, 1.0]]), warm_start=warm_start)


@settings(max_examples=20, deadline=None)
@given(n=st.integers(1, 6), seed=st.integers(0, 2**16), scale=st.sampled_from([1e-3, 1.0, 1e4]))
def test_warm_started_assignment_is_still_the_optimum(n, seed, scale):
    """The Sinkhorn potentials only shift rows and columns: the solve stays exact at any scale."""
    s = scale * torch.randn(n, n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    perm = solve_assignment(s, warm_start="sinkhorn")
    best = max(sum(s[i, j].item() for i, j in enumerate(p)) for p in itertools.permutations(range(n)))
    assert sum(s[i, j].item() for i, j in enumerate(perm.tolist())) == pytest.approx(best, rel=1e-12, abs=1e-12 * scale)


def test_warm_start_potentials_are_feasible_and_tight():
    """u_i + v_j >= s_ij everywhere (the dual of the assignment), and nearly equal along the optimum."""
    from hf_permerge.alignment.hungarian import entropic_duals, matched_similarity

    gen = torch.Generator().manual_seed(1)
    s = torch.randn(300, 300, generator=gen) + 3 * torch.eye(300)[torch.randperm(300, generator=gen)]
    u, v = entropic_duals(s)
    assert float((s - u[:, None] - v[None, :]).max()) <= 1e-5
    best = matched_similarity(s, solve_assignment(s, warm_start="none"))
    dual_value = float(u.double().sum() + v.double().sum())
    assert best <= dual_value + 1e-3  # weak duality
    assert dual_value - best < 0.02 * 300 * float(s.max() - s.min())  # within the last temperature per unit


def test_warm_start_finds_the_planted_permutation_and_matches_plain_solves():
    gen = torch.Generator().manual_seed(2)
    n = 600
    perm = torch.randperm(n, generator=gen)
    a = torch.randn(n, 50, generator=gen)
    s = torch.nn.functional.cosine_similarity(
        a[:, None], (a[perm] + 0.3 * torch.randn(n, 50, generator=gen))[None], dim=-1
    )
    found = solve_assignment(s, warm_start="sinkhorn")
    assert torch.equal(perm[found], torch.arange(n))
    assert torch.equal(found, solve_assignment(s, warm_start="none"))
    assert torch.equal(solve_assignments({"g": s}, warm_start="sinkhorn")["g"], found)


def test_matchers_reach_the_same_optimum_with_and_without_the_warm_start(data, monkeypatch):
    """The activation and weight matchers, with every group warm-started ('auto' from 16 units) and with
    none: equally good matchings (the same objective), on briefly trained nets. Their permutations may differ
    where units tie (dead units), as they do on some CPUs."""
    from hf_permerge.alignment import hungarian

    a, b = (briefly_trained(mlp(seed, width=64, depth=3), data, seed=seed) for seed in (0, 1))
    calls = []
    duals = hungarian.entropic_duals
    monkeypatch.setattr(hungarian, "entropic_duals", lambda s, start=None: calls.append(len(s)) or duals(s, start))
    found = {}
    for min_units in (16, 10**9):
        monkeypatch.setattr(hungarian, "WARM_START_MIN_UNITS", {"cpu": min_units, "cuda": min_units})
        found[min_units] = [get_matcher(name).match(a, b, data) for name in ("activation", "weight")]
        assert (len(calls) > 0) == (min_units == 16)
        calls.clear()
    for name, warm, plain in zip(("activation", "weight"), found[16], found[10**9]):
        assert_equally_good(objective(name, a, b, warm, data), objective(name, a, b, plain, data))


@torch.no_grad()
def with_tied_units(model, dead=(0, 1), duplicated=((2, 3), (4, 5))):
    """Exact ties on purpose in `hidden.0` of an MLP: `dead` units never fire (zero weights, negative bias) and
    each pair in `duplicated` is one unit twice (the same incoming and outgoing weights)."""
    w, bias, out = model.layers[0].weight, model.layers[0].bias, model.layers[1].weight
    for u in dead:
        w[u], bias[u] = 0.0, -1.0
    for u, v in duplicated:
        w[v], bias[v], out[:, v] = w[u], bias[u], out[:, u]
    return model


def swapped(perms, group, u, v):
    """`perms` with the slots of units u and v of the permuted net exchanged."""
    p = perms[group].clone()
    i, j = int((p == u).nonzero()), int((p == v).nonzero())
    p[[i, j]] = p[[j, i]]
    return Permutations({**perms, group: p})


@pytest.mark.parametrize("name", ["activation", "weight"])
def test_tied_units_give_equally_good_matchings_whatever_the_labels_or_the_solver(name, data, monkeypatch):
    """Dead and duplicated units make the optimum non-unique, so a solver's choice among the tied permutations
    depends on column order, its start and the floats' last bits. Relabelled inputs and the warm-started
    solver must reach the same objective; no test may expect one particular permutation here."""
    from hf_permerge.alignment import hungarian

    # Dead units tie only in the data's eyes: their outgoing weights differ, so weight matching (a local descent)
    # would take them as different starts and may settle elsewhere. Its ties here are duplicated units.
    dead = (0, 1) if name == "activation" else ()
    a, b = mlp(0, width=16), with_tied_units(mlp(1, width=16), dead=dead)
    settings = {"num_examples": 256} if name == "activation" else {}
    found = get_matcher(name, **settings).match(a, b, data)
    best = objective(name, a, b, found, data, **settings)
    for u, v in ((2, 3), (4, 5), *([dead] if dead else [])):
        tied = swapped(found, "hidden.0", u, v)  # the same objective, another permutation
        assert tied != found
        assert_equally_good(objective(name, a, b, tied, data, **settings), best)
    monkeypatch.setattr(hungarian, "WARM_START_MIN_UNITS", {"cpu": 4, "cuda": 4})
    for seed in range(4):
        pi = Permutations.random(b.permutation_spec(), seed=seed)
        relabelled = get_matcher(name, **settings).match(a, pi.apply(b), data).compose(pi)
        assert_equally_good(objective(name, a, b, relabelled, data, **settings), best)


def test_warm_start_choices():
    from hf_permerge.alignment.hungarian import entropic_duals, uses_warm_start

    s = torch.zeros(1024, 1024)
    assert not uses_warm_start(s)  # 'auto' on the CPU: from 2048 units
    assert uses_warm_start(torch.zeros(2048, 2048))
    assert uses_warm_start(s, warm_start="sinkhorn")
    assert not uses_warm_start(s, blocks=4, warm_start="sinkhorn")  # blocked groups solve block by block
    assert entropic_duals(s) is None  # constant: nothing to estimate
    with pytest.raises(ValueError, match="warm_start must be one of"):
        solve_assignment(s, warm_start="fast")


def test_coupled_solve_with_a_rigid_group_is_optimal_over_whole_block_moves():
    """A rotary layer's heads (GQA sizes: 3 key/value heads of 2 units, each with 4 query units): the rigid groups
    keep their units in order within blocks, the other permutes within them; brute force over every such choice."""
    from hf_permerge.alignment.hungarian import matched_similarity

    gen = torch.Generator().manual_seed(0)
    sims = [torch.randn(12, 12, generator=gen), torch.randn(6, 6, generator=gen), torch.randn(6, 6, generator=gen)]
    rigid = (True, True, False)
    found = solve_coupled(sims, 3, rigid)
    value = sum(matched_similarity(s, p) for s, p in zip(sims, found))
    best = -float("inf")
    for sigma in itertools.permutations(range(3)):
        total = 0.0
        for s, r in zip(sims, rigid):
            w = len(s) // 3
            for i, j in enumerate(sigma):
                sub = s[i * w : (i + 1) * w, j * w : (j + 1) * w]
                within = [torch.arange(w)] if r else [torch.tensor(q) for q in itertools.permutations(range(w))]
                total += max(matched_similarity(sub, q) for q in within)
        best = max(best, total)
    assert value == pytest.approx(best)
    for s, p, r in zip(sims, found, rigid):
        w = len(s) // 3
        blocks = p.view(3, w)
        assert (blocks // w == blocks[:, :1] // w).all()  # whole blocks
        assert torch.equal(blocks[:, 0] // w, found[0].view(3, 4)[:, 0] // 4)  # alike in every group
        if r:
            assert torch.equal(blocks % w, torch.arange(w).expand(3, w))  # in order within them


def test_a_rigid_group_alone_stays_in_place_and_random_permutations_respect_it():
    s = torch.randn(8, 8)
    assert torch.equal(solve_assignment(s, blocks=2, rigid=True), torch.arange(8))
    qk = PermGroup("qk", 8, (("q.weight", 0), ("k.weight", 0)), "q", blocks=2, rigid=True)
    vo = PermGroup("vo", 8, (("v.weight", 0), ("o.weight", 1)), "v", blocks=2)
    spec = PermutationSpec((qk, vo), couplings=(("qk", "vo"),))
    moved = 0
    for seed in range(8):
        perms = Permutations.random(spec, seed)
        perms.validate(spec)
        assert torch.equal(perms["qk"] % 4, torch.arange(8) % 4)
        moved += not torch.equal(perms["qk"], torch.arange(8))
    assert moved  # whole blocks do move
    with pytest.raises(ValueError, match="within its blocks"):
        Permutations({"qk": torch.tensor([1, 0, 2, 3, 4, 5, 6, 7]), "vo": torch.arange(8)}).validate(spec)


# Section 2: streaming statistics -------------------------------------------------------------------


def full_matrix_similarity(a, b, kind):
    """The d x n reference computation the streaming statistics must reproduce."""
    if kind == "cosine":
        return torch.nn.functional.normalize(a, dim=0).T @ torch.nn.functional.normalize(b, dim=0)
    if kind == "correlation":
        return torch.corrcoef(torch.cat([a, b], 1).T)[: a.shape[1], a.shape[1] :]
    return -torch.cdist(a.T, b.T).square() / a.shape[0]


@pytest.mark.parametrize("kind", ["cosine", "correlation", "l2"])
def test_streaming_statistics_equal_the_full_matrix_computation(kind):
    gen = torch.Generator().manual_seed(0)
    a = torch.relu(torch.randn(300, 12, generator=gen, dtype=torch.float64) + 0.3)
    b = a[:, torch.randperm(12, generator=gen)] * 2 + torch.randn(300, 12, generator=gen, dtype=torch.float64)
    expected = full_matrix_similarity(a, b, kind)
    for batch in (300, 64, 7):
        stats = ActivationStatistics.zeros(12, product_dtype=torch.float64)
        for s in range(0, 300, batch):
            stats.update(a[s : s + batch], b[s : s + batch])
        torch.testing.assert_close(stats.similarity(kind), expected, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("kind", ["cosine", "correlation", "l2"])
def test_float32_products_of_shifted_activations_keep_the_centred_similarities(kind):
    """Units with a mean 100x their spread: unshifted float32 sums would lose the covariance to cancellation."""
    gen = torch.Generator().manual_seed(1)
    a = 50 + 0.5 * torch.randn(4000, 16, generator=gen, dtype=torch.float64)
    b = a[:, torch.randperm(16, generator=gen)] + 0.3 * torch.randn(4000, 16, generator=gen, dtype=torch.float64) - 20
    expected = full_matrix_similarity(a.float().double(), b.float().double(), kind)  # what the net would give
    stats = ActivationStatistics.zeros(16)  # float32 products
    for s in range(0, 4000, 1000):
        stats.update(a[s : s + 1000].float(), b[s : s + 1000].float())
    assert stats.cross.dtype == torch.float64
    scale = expected.abs().max()
    torch.testing.assert_close(stats.similarity(kind), expected, rtol=0, atol=2e-5 * float(scale))


def test_dead_units_get_zero_similarity_not_nan():
    a, b = torch.rand(50, 3, dtype=torch.float64), torch.rand(50, 3, dtype=torch.float64)
    a[:, 1] = 0.0
    b[:, 2] = 0.7  # constant: no variance
    stats = ActivationStatistics.zeros(3)
    stats.update(a, b)
    for kind in ("cosine", "correlation"):
        s = stats.similarity(kind)
        assert torch.isfinite(s).all() and (s[1] == 0).all()
    assert (stats.similarity("correlation")[:, 2] == 0).all()


@pytest.mark.parametrize("name", NETS)
def test_one_pass_over_many_nets_gives_every_pairs_statistics(name, data):
    """`pairwise_activation_statistics` runs each batch through every net once; each pair's similarities are
    those of a pass over that pair alone (up to rounding: its batches are smaller)."""
    from hf_permerge.alignment.activation import pairwise_activation_statistics

    models = [NETS[name](seed) for seed in range(4)]
    spec = models[0].permutation_spec()
    x = data.pixel_values[:60]
    together = pairwise_activation_statistics(models, x, spec, batch_size=20, products="float64")
    assert sorted(together) == [(i, j) for i in range(4) for j in range(i + 1, 4)]
    for (i, j), stats in together.items():
        alone = activation_statistics(models[i], models[j], x, spec, batch_size=20, products="float64")
        for g in spec.names:
            torch.testing.assert_close(
                stats[g].similarity("correlation"), alone[g].similarity("correlation"), rtol=1e-5, atol=1e-6
            )
            assert stats[g].count == alone[g].count


@pytest.mark.parametrize("name", NETS)
def test_statistics_do_not_depend_on_the_batch_size(name, data):
    a, b = NETS[name](0), NETS[name](1)
    spec = a.permutation_spec()
    x = data.pixel_values[:40]
    for pre, products in ((False, "float64"), (True, "float64"), (False, "float32"), (True, "float32")):
        whole = activation_statistics(a, b, x, spec, preactivation=pre, batch_size=40, products=products)
        batched = activation_statistics(a, b, x, spec, preactivation=pre, batch_size=17, products=products)
        for g in spec.names:
            for kind in ("cosine", "correlation", "l2"):
                # float32 forward passes round differently per batch size; float32 products add ~1e-6 relative
                w = whole[g].similarity(kind)
                tol = 1e-6 if products == "float64" else 2e-5 * float(w.abs().max())
                torch.testing.assert_close(batched[g].similarity(kind), w, rtol=1e-5, atol=tol)


def test_statistics_see_every_spatial_position_as_a_sample_of_its_channel(data):
    a, b = cnn(0, layers="4-avg-8"), cnn(1, layers="4-avg-8")
    x = data.pixel_values[:20]
    stats = activation_statistics(a, b, x, a.permutation_spec(), preactivation=True, batch_size=8, products="float64")
    with torch.no_grad():
        act_a = a.blocks[0].conv(x).permute(0, 2, 3, 1).reshape(-1, 4).double()
        act_b = b.blocks[0].conv(x).permute(0, 2, 3, 1).reshape(-1, 4).double()
    assert stats["conv.0"].count == 20 * 28 * 28
    torch.testing.assert_close(
        stats["conv.0"].similarity("correlation"),
        full_matrix_similarity(act_a, act_b, "correlation"),
        rtol=1e-6,
        atol=1e-8,
    )
    assert stats["conv.1"].count == 20 * 14 * 14
    post = activation_statistics(a, b, x, a.permutation_spec(), preactivation=False, batch_size=8)
    assert post["conv.0"].count == 20 * 14 * 14  # the block output, after its 2x2 average pool
    assert post["conv.1"].count == 20  # after the global pool: one sample per image


# Section 2 / App. B: the matchers find the right permutations -------------------------------------


@pytest.mark.parametrize("name", NETS)
@pytest.mark.parametrize("variant", ACTIVATION_VARIANTS, ids=lambda v: f"{v['similarity']}-pre{v['preactivation']}")
def test_self_match_finds_identity_by_activations(name, variant, data):
    a = NETS[name]()
    perms = get_matcher("activation", num_examples=128, **variant).match(a, a, data)
    assert perms.is_identity()


WEIGHT_VARIANTS = [{"bottom_up": False}, {"bottom_up": True, "max_iter": 0}, {}]
"""Git Re-Basin (from the identity); the paper's App. D pass alone; App. D's pass refined by coordinate descent
(the default)."""


@pytest.mark.parametrize("name", NETS)
@pytest.mark.parametrize("variant", WEIGHT_VARIANTS, ids=["rebasin", "appD", "appD+rebasin"])
def test_self_match_finds_identity_by_weights(name, variant):
    a = NETS[name]()
    assert get_matcher("weight", **variant).match(a, a).is_identity()


@pytest.mark.parametrize("name", NETS)
@pytest.mark.parametrize("variant", ACTIVATION_VARIANTS, ids=lambda v: f"{v['similarity']}-pre{v['preactivation']}")
def test_matching_recovers_a_known_permutation_by_activations(name, variant, data):
    a = NETS[name]()
    pi = Permutations.random(a.permutation_spec(), seed=7)
    found = get_matcher("activation", num_examples=128, **variant).match(a, pi.apply(a), data)
    assert found == pi.inverse()
    assert all(torch.equal(found.apply(pi.apply(a)).state_dict()[k], v) for k, v in a.state_dict().items())


@pytest.mark.parametrize("name", NETS)
@pytest.mark.parametrize("variant", WEIGHT_VARIANTS, ids=["rebasin", "appD", "appD+rebasin"])
def test_matching_recovers_a_known_permutation_by_weights(name, variant):
    a = NETS[name]()
    pi = Permutations.random(a.permutation_spec(), seed=7)
    assert get_matcher("weight", **variant).match(a, pi.apply(a)) == pi.inverse()


@pytest.mark.parametrize("name", [*NETS, "mlp_depth1"])
@pytest.mark.parametrize("bottom_up", [False, True])
def test_weight_matching_stops_at_a_fixed_point_solving_only_groups_whose_neighbours_moved(
    name, bottom_up, monkeypatch
):
    """A group is re-solved only when a group it shares a tensor with changed; the result is still a fixed point
    (no group's own assignment improves it), and a one-hidden-layer MLP needs one solve per match, not two, also
    when the bottom-up pass starts it."""
    from hf_permerge.alignment import weight

    a, b = (mlp(seed, depth=1) if name == "mlp_depth1" else NETS[name](seed) for seed in (0, 1))
    calls = []
    solve = weight.solve_assignment
    monkeypatch.setattr(weight, "solve_assignment", lambda s, blocks=1, **kw: calls.append(1) or solve(s, blocks, **kw))
    spec = a.permutation_spec()
    perms, sims = weight.solve_linear_matching(spec, a.state_dict(), b.state_dict(), bottom_up_first=bottom_up)
    for g in spec.names:
        best = solve(sims[g])
        assert (
            float(sims[g][torch.arange(len(best)), best].sum())
            <= float(sims[g][torch.arange(len(best)), perms[g]].sum()) * (1 + 1e-12) + 1e-12
        )
    if name == "mlp_depth1":  # the bottom-up pass saw every tensor of the only group
        assert len(calls) == 1


def test_weight_matcher_refuses_a_setting_that_would_match_nothing():
    with pytest.raises(ValueError, match="max_iter=0 without bottom_up=True would return the identity"):
        get_matcher("weight", max_iter=0, bottom_up=False)


# App. B's objective compares a net with a *moved* copy of the other: for b = a it is symmetric in
# pi and pi^{-1} and its optimum need not be the identity (first order, moving towards a permuted copy
# of yourself can look downhill). What must hold is that the labelling of model_b's units does not
# matter: matching a onto pi(b) gives the matching of a onto b, composed with pi^{-1}.
@pytest.mark.parametrize("name", ["mlp", "cnn"])
@pytest.mark.parametrize("preconditioner", ["foof", "none"])
def test_gradient_matching_does_not_depend_on_how_units_are_labelled(name, preconditioner, data):
    a, b = NETS[name](0), NETS[name](1)
    pi = Permutations.random(a.permutation_spec(), seed=7)
    matcher = get_matcher("gradient", preconditioner=preconditioner, num_examples=32 if name == "cnn" else 256)
    found = matcher.match(a, b, data)
    assert matcher.match(a, pi.apply(b), data).compose(pi) == found
    assert not found.is_identity()


@pytest.mark.parametrize("matcher", ["activation", "weight", "gradient"])
@pytest.mark.parametrize("name", ["mlp", "cnn"])
def test_matched_nets_are_more_similar_than_unmatched_ones(matcher, name, data, trained_pair):
    a, b = trained_pair(name)
    perms = get_matcher(matcher, num_examples=128) if matcher != "weight" else get_matcher("weight")
    perms = perms.match(a, b, data)
    perms.validate(a.permutation_spec())
    groups = perms.info["groups"]
    assert set(groups) == set(a.permutation_spec().names)
    for g in groups.values():
        assert g["similarity_matched"] >= g["similarity_identity"]
    assert sum(g["similarity_matched"] for g in groups.values()) > sum(
        g["similarity_identity"] for g in groups.values()
    )


# Interface -----------------------------------------------------------------------------------------


def test_registry_names_the_matchers_and_refuses_unknown_ones():
    assert get_matcher("activation").name == "activation"
    assert get_matcher("weight", max_iter=5).settings == {"max_iter": 5, "seed": 0, "bottom_up": True}
    assert get_matcher("gradient").settings["preconditioner"] == "foof"
    with pytest.raises(ValueError, match="unknown matcher 'hungarian'"):
        get_matcher("hungarian")
    with pytest.raises(ValueError, match=r"no setting\(s\) \['similarity'\]"):
        get_matcher("weight", similarity="cosine")
    with pytest.raises(ValueError, match="similarity='dot' is not supported"):
        get_matcher("activation", similarity="dot")
    with pytest.raises(ValueError, match="preconditioner='kfac' is not supported"):
        get_matcher("gradient", preconditioner="kfac")


def test_matching_refuses_nets_of_different_architectures(data):
    with pytest.raises(ValueError, match="different architectures"):
        get_matcher("weight").match(mlp(width=32), mlp(width=16))
    with pytest.raises(ValueError, match="different architectures"):
        get_matcher("weight").match(mlp(depth=2), mlp(depth=3))
    with pytest.raises(ValueError, match="different types"):
        get_matcher("weight").match(mlp(), cnn())
    with pytest.raises(ValueError, match="needs data"):
        get_matcher("activation").match(mlp(), mlp())


def test_images_that_do_not_fit_the_model_are_refused():
    split = TensorSplit(torch.zeros(4, 3, 32, 32), torch.zeros(4, dtype=torch.long), "cifar-like")
    with pytest.raises(ValueError, match=r"do not fit the model.*\(1, 28, 28\)"):
        get_matcher("activation").match(mlp(), mlp(), split)


def test_a_datasets_dataset_matches_like_its_tensors():
    datasets = pytest.importorskip("datasets")
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(64, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, size=64)
    ds = datasets.Dataset.from_dict({"image": list(images), "label": labels.tolist()})
    a, b = mlp(0), mlp(1)
    split = TensorSplit(normalise(images, a.config.image_mean, a.config.image_std), torch.from_numpy(labels), "x")
    from_ds = get_matcher("activation").match(a, b, as_tensor_split(ds, a))  # converted once, at the edge
    assert from_ds == get_matcher("activation").match(a, b, split)
    assert from_ds.info["data"]["num_examples"] == 64


def test_matchers_take_tensors_and_name_the_conversion_of_a_dataset():
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_dict({"image": [np.zeros((28, 28), dtype=np.uint8)] * 4})
    with pytest.raises(TypeError, match="as_tensor_split"):
        get_matcher("activation").match(mlp(0), mlp(1), ds)


# Permutations as a value -------------------------------------------------------------------------------


def test_permutations_compare_as_plain_bools_whatever_the_other_side():
    p = Permutations({"a": torch.arange(4), "b": torch.tensor([1, 0, 2])})
    same = Permutations({"a": torch.arange(4), "b": torch.tensor([1, 0, 2])}, {"matcher": "weight"})
    cases = [
        same,
        Permutations({"a": torch.arange(4)}),
        Permutations({"a": torch.arange(5), "b": torch.arange(3)}),
        Permutations({"a": torch.arange(4), "b": torch.arange(3)}),
        {"a": [0, 1, 2, 3], "b": [1, 0, 2]},
        {"a": "not a tensor", "b": None},
        None,
        3,
        "a",
    ]
    results = [p == other for other in cases]
    assert all(type(r) is bool for r in results)
    assert results == [True, False, False, False, True, False, False, False, False]
    assert all(type(p != other) is bool for other in cases)


def test_permutations_repr_is_short_and_a_failed_assert_says_what_differs():
    from conftest import pytest_assertrepr_compare

    many = Permutations({f"hidden.{i}": torch.arange(4096) for i in range(20)}, {"matcher": "activation"})
    assert len(repr(many)) < 200 and "14 more" in repr(many)
    p = Permutations({"g": torch.arange(6), "h": torch.arange(3)})
    q = Permutations({"g": torch.tensor([1, 0, 2, 3, 4, 5]), "k": torch.arange(3)})
    lines = pytest_assertrepr_compare("==", p, q)
    assert "group 'g': 2 of 6 slots differ (slot 0: 0 vs 1, slot 1: 1 vs 0)" in lines
    assert "group 'h' only on the left" in lines and "group 'k' only on the right" in lines
    assert p.difference(p) == [] and pytest_assertrepr_compare("==", p, 3) is None
