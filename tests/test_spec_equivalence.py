"""`PermutationSpec.equivalent`: the same groups permuting the same tensor axes, whatever the groups are called."""

from __future__ import annotations

import dataclasses

import pytest

import hf_permerge  # noqa: F401
from hf_permerge.alignment import PermGroup, PermutationSpec, trace_permutation_spec
from hf_permerge.models import (
    PermCNNConfig,
    PermCNNForImageClassification,
    PermMLPConfig,
    PermMLPForImageClassification,
)


def attention_spec(names=("qk", "vo"), order=(0, 1)) -> PermutationSpec:
    groups = [
        PermGroup(names[0], 8, (("q.weight", 0), ("k.weight", 0)), "q", blocks=2),
        PermGroup(names[1], 8, (("v.weight", 0), ("o.weight", 1)), "v", blocks=2),
    ]
    return PermutationSpec(tuple(groups[i] for i in order), couplings=(names,))


@pytest.mark.parametrize(
    "model_class,config",
    [
        (PermMLPForImageClassification, PermMLPConfig(depth=1, width=16)),
        (PermMLPForImageClassification, PermMLPConfig(depth=3, width=16, bias=True)),
        (PermCNNForImageClassification, PermCNNConfig(layers="8-8-avg-16-16", batch_norm=True)),
        (PermCNNForImageClassification, PermCNNConfig(layers="8-16-avg", bias=False)),
    ],
    ids=["mlp-1", "mlp-3-bias", "cnn-bn", "cnn-no-bias"],
)
def test_traced_spec_matches_declared_spec_for_our_models(model_class, config):
    """README: `trace_permutation_spec(model).equivalent(model.permutation_spec())` for ours."""
    model = model_class(config)
    traced, declared = trace_permutation_spec(model), model.permutation_spec()
    assert traced.equivalent(declared) and declared.equivalent(traced)


def test_renamed_and_reordered_groups_are_equivalent():
    assert attention_spec().equivalent(attention_spec(names=("heads.qk", "heads.vo"), order=(1, 0)))


def test_where_activations_are_read_does_not_matter():
    spec = attention_spec()
    hooked_elsewhere = PermutationSpec(
        tuple(dataclasses.replace(g, activation="act", preactivation="pre", unit_axis=2) for g in spec.groups),
        spec.couplings,
    )
    assert spec.equivalent(hooked_elsewhere) and spec != hooked_elsewhere


@pytest.mark.parametrize("change", ["axis", "size", "blocks", "rigid", "coupling", "extra group", "missing group"])
def test_specs_that_permute_differently_are_not_equivalent(change):
    spec = attention_spec()
    qk, vo = spec.groups
    other = {
        "axis": PermutationSpec((dataclasses.replace(qk, axes=(("q.weight", 0), ("k.weight", 1))), vo), spec.couplings),
        "size": PermutationSpec((dataclasses.replace(qk, size=16), vo), spec.couplings),
        "blocks": PermutationSpec(
            (dataclasses.replace(qk, blocks=4), dataclasses.replace(vo, blocks=4)), spec.couplings
        ),
        "rigid": PermutationSpec((dataclasses.replace(qk, rigid=True), vo), spec.couplings),
        "coupling": PermutationSpec(spec.groups),
        "extra group": PermutationSpec((qk, vo, PermGroup("mlp", 4, (("fc.weight", 0),), None)), spec.couplings),
        "missing group": PermutationSpec((dataclasses.replace(qk, blocks=1),)),
    }[change]
    assert not spec.equivalent(other) and not other.equivalent(spec)
