"""Aligning N nets with each other (`reference="average"`) instead of each onto net 0.

Invariants: permuted copies of one net are mapped back onto it from the identity; every permuted net computes
the function it computed before; net 0 stays as it is; the activation objective summed over all pairs of
nets never falls below the star alignment's it starts from.
"""

from __future__ import annotations

import itertools
import json

import pytest
import torch
from objectives import activation_objective, assert_equally_good, summed_objective

from hf_permerge.alignment import ActivationMatcher, Permutations, WeightMatcher, activation_statistics
from hf_permerge.alignment.average import align_activations_jointly, align_to_average
from hf_permerge.data import load_tensors
from hf_permerge.merging import PermMerger


def states_equal(a, b) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("joint", ["weight", "activation"])
def test_permuted_copies_of_one_net_are_mapped_back_onto_it(tiny_pair, tiny_fmnist, joint):
    merger = PermMerger.from_pretrained(tiny_pair)
    net = merger.load(0)
    spec = net.permutation_spec()
    copies = [Permutations.random(spec, seed).apply(net) for seed in (1, 2, 3)]
    models = [net, *copies]
    start = [Permutations.identity(spec) for _ in models]  # not the star alignment: from scratch
    if joint == "weight":
        perms, rounds = align_to_average(models, WeightMatcher(), start=start)
    else:
        data = load_tensors("fashion_mnist", "train", data_dir=tiny_fmnist)
        perms, rounds = align_activations_jointly(models, ActivationMatcher(num_examples=500), data, start)
    assert rounds["converged"] and perms[0].is_identity()
    for p, copy in zip(perms[1:], copies):
        assert states_equal(p.apply(copy), net)


def total_pairwise_objective(merger, matcher: str, data) -> float:
    """The objective each matcher maximises, summed over all pairs of aligned nets."""
    nets = [merger.permuted(i) if i else merger.load(0) for i in range(merger.num_nets)]
    keys = list(merger.spec.axes_to_perm())
    total = 0.0
    for a, b in itertools.combinations(nets, 2):
        if matcher == "weight":
            total += sum(torch.sum(a.state_dict()[k].double() * b.state_dict()[k].double()).item() for k in keys)
        else:
            stats = activation_statistics(a, b, data.pixel_values, merger.spec)
            total += sum(stats[g].similarity("cosine").diagonal().sum().item() for g in merger.spec.names)
    return total


@pytest.mark.parametrize("matcher", ["activation", "weight"])
def test_aligning_onto_each_other_keeps_every_function_and_net_0(tiny_pair, tiny_fmnist, matcher):
    data = load_tensors("fashion_mnist", "train", data_dir=tiny_fmnist).subset(1000, 0)
    star = PermMerger.from_pretrained(tiny_pair)
    star.align(matcher=matcher)
    joint = PermMerger.from_pretrained(tiny_pair)
    perms = joint.align(matcher=matcher, reference="average", max_rounds=20)
    assert joint.alignment["converged"]
    assert perms[0].is_identity()
    assert joint.alignment["reference"] == "average" and joint.alignment["rounds"] >= 1
    assert isinstance(joint.alignment["converged"], bool)
    x = load_tensors("fashion_mnist", "test", data_dir=tiny_fmnist).pixel_values[:64]
    with torch.no_grad():
        for i in range(1, joint.num_nets):
            torch.testing.assert_close(
                joint.permuted(i)(pixel_values=x).logits, joint.load(i)(pixel_values=x).logits, atol=1e-5, rtol=1e-5
            )
    # coordinate ascent from the star alignment on this very objective (activations: on the matcher's 1000 images)
    assert total_pairwise_objective(joint, matcher, data) >= total_pairwise_objective(star, matcher, data) - 1e-3


def test_the_result_is_a_fixed_point_no_single_net_can_improve(tiny_fmnist):
    """What `converged` claims, checked independently of the rounds' bookkeeping (which skips solves): re-matching
    any one net to the others, as aligned, raises no objective. max_iter=1 leaves the weight matcher short of
    its own fixed point, the case where a net must be matched again after its own change."""
    from hf_permerge.alignment.average import _inner, average_of
    from hf_permerge.alignment.hungarian import matched_similarity, solve_assignment
    from hf_permerge.models import PermMLPConfig, PermMLPForImageClassification

    data = load_tensors("fashion_mnist", "train", data_dir=tiny_fmnist)
    models = [PermMLPForImageClassification(PermMLPConfig(depth=3, width=16, seed=seed)).eval() for seed in range(4)]
    spec = models[0].permutation_spec()  # three coupled layers: one weight-matching sweep is not exact
    start = [Permutations.identity(spec) for _ in models]
    keys = list(spec.axes_to_perm())

    matcher = WeightMatcher(max_iter=1)
    perms, rounds = align_to_average(models, matcher, start=start, max_rounds=100)
    assert rounds["converged"]
    aligned = [p.apply(m) for p, m in zip(perms, models)]
    for i, model in enumerate(aligned):
        reference = average_of([a for j, a in enumerate(aligned) if j != i])
        again = matcher.match(reference, model).apply(model)
        assert _inner(reference, again, keys) <= _inner(reference, model, keys) + 1e-6 * abs(
            _inner(reference, model, keys)
        )

    perms, rounds = align_activations_jointly(models, ActivationMatcher(num_examples=500), data, start, max_rounds=100)
    assert rounds["converged"]
    aligned = [p.apply(m) for p, m in zip(perms, models)]
    x = data.subset(500, 0).pixel_values
    sims = {
        (i, j): activation_statistics(a, b, x, spec)
        for i, a in enumerate(aligned)
        for j, b in enumerate(aligned)
        if i < j
    }
    for i in range(len(aligned)):
        for g in spec.names:
            cost = sum(
                (sims[i, j][g].similarity("cosine") if i < j else sims[j, i][g].similarity("cosine").T).T.double()
                for j in range(len(aligned))
                if j != i
            )
            identity = matched_similarity(cost, torch.arange(len(cost)))
            assert matched_similarity(cost, solve_assignment(cost)) <= identity + 1e-6 * abs(identity)


def test_reference_average_is_refused_where_it_does_not_apply(tiny_pair, tmp_path, capsys, run_cli):
    merger = PermMerger.from_pretrained(tiny_pair)
    with pytest.raises(ValueError, match="reference='middle' is not supported"):
        merger.align(reference="middle")
    with pytest.raises(ValueError, match="not 'gradient'; use reference='net_0'"):
        merger.align(matcher="gradient", reference="average")
    with pytest.raises(ValueError, match="max_rounds=0 must be >= 1"):
        merger.align(reference="average", max_rounds=0)
    assert run_cli("merge", tiny_pair, "--max-rounds", 3, "-q", "-o", tmp_path / "a") == 2
    assert "--max-rounds applies to --reference average" in capsys.readouterr().err
    assert (
        run_cli("merge", tiny_pair, "--matcher", "gradient", "--reference", "average", "-q", "-o", tmp_path / "b") == 2
    )
    assert "implemented for the activation and weight matchers" in capsys.readouterr().err
    assert run_cli("merge", tiny_pair, "--vanilla", "--reference", "average", "-q", "-o", tmp_path / "c") == 2
    assert "--reference cannot be used with --vanilla" in capsys.readouterr().err
    assert not any((tmp_path / n).exists() for n in "abc")
    from hf_permerge.config import config_from_dict

    with pytest.raises(ValueError, match="reference: average is implemented for the activation and weight"):
        config_from_dict({"model": {"type": "mlp"}, "alignment": {"matcher": "gradient", "reference": "average"}})


def test_cli_merges_all_nets_aligned_onto_each_other(tiny_pair, tmp_path, run_cli):
    assert (
        run_cli(
            "merge",
            tiny_pair,
            "--all",
            "--reference",
            "average",
            "--num-examples",
            500,
            "-q",
            "-o",
            tmp_path / "merged",
        )
        == 0
    )
    config = json.loads((tmp_path / "merged" / "merge_config.json").read_text())
    assert config["alignment"]["reference"] == "average" and config["merge"]["nets"] == [0, 1, 2]
    card = (tmp_path / "merged" / "README.md").read_text()
    assert "reference=average" in card and "to line up with one another" in card


def test_warm_starts_carried_between_rounds_reach_the_same_optimum(tiny_fmnist, monkeypatch):
    """Each net's solves start from its previous solve's column potentials (kept by the net's own units, which
    stay put while its slots move): the same summed objective as plain solves, for both matchers (where units
    tie, the permutations themselves may differ)."""
    from hf_permerge.alignment import hungarian
    from hf_permerge.models import PermMLPConfig, PermMLPForImageClassification

    data = load_tensors("fashion_mnist", "train", data_dir=tiny_fmnist)
    models = [PermMLPForImageClassification(PermMLPConfig(depth=2, width=16, seed=seed)).eval() for seed in range(4)]
    start = [Permutations.identity(models[0].permutation_spec()) for _ in models]
    carried = []
    duals = hungarian.entropic_duals
    monkeypatch.setattr(
        hungarian, "entropic_duals", lambda s, start=None: carried.append(start is not None) or duals(s, start)
    )
    found = {}
    for min_units in (8, 10**9):
        monkeypatch.setattr(hungarian, "WARM_START_MIN_UNITS", {"cpu": min_units, "cuda": min_units})
        found[min_units] = [
            align_to_average(models, WeightMatcher(), start=start)[0],
            align_activations_jointly(models, ActivationMatcher(num_examples=500), data, start)[0],
        ]
    assert sum(carried) > 0 and not all(carried)  # first solves from scratch, later ones carried
    for name, warm, plain in zip(("weight", "activation"), found[8], found[10**9]):
        settings = {"num_examples": 500} if name == "activation" else {}
        assert_equally_good(
            summed_objective(name, models, warm, data, **settings),
            summed_objective(name, models, plain, data, **settings),
        )


def test_the_star_alignment_found_on_the_way_is_match_manys(tiny_pair, tiny_fmnist):
    """Without a start the joint activation alignment solves the star from the pairs with net 0 it computes anyway:
    the same start as `match_many`'s (up to the rounding of other batch sizes: equally good), with the same
    header."""
    merger = PermMerger.from_pretrained(tiny_pair)
    models = [merger.load(i) for i in range(merger.num_nets)]
    data = load_tensors("fashion_mnist", "train", data_dir=tiny_fmnist)
    matcher = ActivationMatcher(num_examples=500)
    star = [Permutations.identity(merger.spec), *matcher.match_many(models[0], models[1:], data)]
    kept, _ = align_activations_jointly(models, matcher, data, None, tolerance=float("inf"))  # no change taken
    for i in range(1, len(models)):
        assert_equally_good(
            activation_objective(models[0], models[i], kept[i], data, num_examples=500),
            activation_objective(models[0], models[i], star[i], data, num_examples=500),
        )
    assert [{k: v for k, v in p.info.items() if k not in ("groups", "reference")} for p in kept[1:]] == [
        {k: v for k, v in p.info.items() if k != "groups"} for p in star[1:]
    ]
    given, _ = align_activations_jointly(models, matcher, data, star)
    assert_equally_good(
        summed_objective("activation", models, given, data, num_examples=500),
        summed_objective(
            "activation", models, align_activations_jointly(models, matcher, data, None)[0], data, num_examples=500
        ),
    )
