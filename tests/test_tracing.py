"""Permutation specs from a traced graph: equal to the hand-written ones, invariant on every model accepted,
clear refusals for what cannot be permuted."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import hf_permerge  # noqa: F401
from hf_permerge.alignment import Permutations, get_matcher
from hf_permerge.alignment.tracing import (
    attach_permutation_spec,
    check_permutation_invariance,
    trace,
    trace_permutation_spec,
)
from hf_permerge.data.tensors import TensorSplit
from hf_permerge.models import (
    PermCNNConfig,
    PermCNNForImageClassification,
    PermMLPConfig,
    PermMLPForImageClassification,
)


class ResidualBlock(nn.Module):
    """conv-BN-ReLU-conv-BN plus a shortcut (identity, or a strided 1x1 conv-BN), then ReLU."""

    def __init__(self, c_in: int, c_out: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.act1 = nn.ReLU()
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut = (
            nn.Identity()
            if stride == 1 and c_in == c_out
            else nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))
        )
        self.act2 = nn.ReLU()

    def forward(self, x):
        return self.act2(self.bn2(self.conv2(self.act1(self.bn1(self.conv1(x))))) + self.shortcut(x))


class ResidualBNCNN(nn.Module):
    """A small ResNet for 28x28 grey images: stem, two residual blocks (the second strided), global pool, linear."""

    main_input_name = "pixel_values"

    def __init__(self, width: int = 8, num_labels: int = 10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        self.block1 = ResidualBlock(width, width)
        self.block2 = ResidualBlock(width, 2 * width, stride=2)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(2 * width, num_labels)

    def forward(self, pixel_values, labels=None, return_dict=None):
        h = self.block2(self.block1(self.stem(pixel_values)))
        logits = self.classifier(torch.flatten(self.pool(h), 1))
        return (logits,) if return_dict is False else logits  # evaluate_model asks for a tuple


class FlattenCNN(nn.Module):
    """conv -> flatten of 8 channels x 28 x 28 positions -> linear: the conv's channels cannot be a group."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 8, 3, padding=1)
        self.act = nn.ReLU()
        self.hidden = nn.Linear(8 * 28 * 28, 16)
        self.act2 = nn.ReLU()
        self.out = nn.Linear(16, 10)

    def forward(self, pixel_values):
        return self.out(self.act2(self.hidden(torch.flatten(self.act(self.conv(pixel_values)), 1))))


def tiny_vit(seed: int = 0):
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(seed)
    cfg = ViTConfig(
        image_size=28,
        patch_size=7,
        num_channels=1,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        num_labels=10,
    )
    return ViTForImageClassification(cfg).eval()


def randomise_norms(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial norm parameters and running statistics, so the invariance check tests them too."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.BatchNorm2d, nn.LayerNorm)):
                m.weight.copy_(1 + 0.5 * torch.randn(m.weight.shape, generator=gen))
                m.bias.copy_(0.5 * torch.randn(m.bias.shape, generator=gen))
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(0.3 * torch.randn(m.running_mean.shape, generator=gen))
                m.running_var.copy_(0.5 + torch.rand(m.running_var.shape, generator=gen))
    return model.eval()


def canonical(spec):
    """A spec without its group names: (size, axes, pre-activation module) per group, sorted."""
    return sorted((g.size, tuple(sorted(g.axes)), g.preactivation) for g in spec.groups)


def x28(n: int = 4, seed: int = 0):
    return torch.randn(n, 1, 28, 28, generator=torch.Generator().manual_seed(seed))


def assert_matcher_undoes(model, scrambled, matcher: str = "activation", n: int = 32, batch_size: int = 16):
    """Matching `scrambled` (a permuted copy of `model`) onto `model` must give back `model`'s weights exactly."""
    data = TensorSplit(x28(n, 8), torch.zeros(n, dtype=torch.long), "random")
    kwargs = {"num_examples": n, "batch_size": batch_size} if matcher == "activation" else {}
    aligned = get_matcher(matcher, **kwargs).match(model, scrambled, data).apply(scrambled)
    for key, value in model.state_dict().items():
        torch.testing.assert_close(aligned.state_dict()[key], value)


# -- the traced spec equals the hand-written one ------------------------------------------------------
@pytest.mark.parametrize("depth,bias", [(1, False), (2, False), (3, True)])
def test_traced_spec_equals_handwritten_mlp_spec(depth, bias):
    model = PermMLPForImageClassification(PermMLPConfig(depth=depth, width=16, bias=bias))
    traced, written = trace_permutation_spec(model), model.permutation_spec()
    assert canonical(traced) == canonical(written)
    assert [g.activation for g in traced.groups] == [g.activation for g in written.groups]


@pytest.mark.parametrize(
    "layers,batch_norm,bias",
    [("8-avg-16", False, True), ("8-8-avg-16-16", True, True), ("8-avg-16", True, False), ("8-16-avg", False, False)],
)
def test_traced_spec_equals_handwritten_cnn_spec(layers, batch_norm, bias):
    model = PermCNNForImageClassification(PermCNNConfig(layers=layers, batch_norm=batch_norm, bias=bias))
    result = trace(model)
    assert canonical(result.spec) == canonical(model.permutation_spec())
    assert result.skipped == {}
    # the nonlinearity module (the hand-written spec names the whole block, after pooling)
    assert [g.activation for g in result.spec.groups] == [f"blocks.{i}.act" for i in range(len(model.blocks))]


# -- invariance on every model it accepts ---------------------------------------------------------------
def test_residual_bn_cnn_groups_tie_the_residual_streams():
    model = randomise_norms(ResidualBNCNN())
    result = trace(model, x28())
    spec = result.spec
    by_name = {g.name: g for g in spec.groups}
    # stem + block1's second conv share the stream; block2's conv2 and its projection shortcut share the next
    assert set(by_name) == {"stem.0", "block1.conv1", "block2.conv1", "block2.conv2"}
    stream1, stream2 = by_name["stem.0"], by_name["block2.conv2"]
    assert {
        ("block1.conv2.weight", 0),
        ("block1.bn2.running_var", 0),
        ("block2.conv1.weight", 1),
        ("block2.shortcut.0.weight", 1),
        ("stem.1.weight", 0),
    } <= set(stream1.axes)
    assert {("block2.shortcut.0.weight", 0), ("block2.shortcut.1.bias", 0), ("classifier.weight", 1)} <= set(
        stream2.axes
    )
    assert stream1.preactivation is None and stream1.activation == "block1.act2"
    assert by_name["block1.conv1"].preactivation == "block1.bn1" and by_name["block1.conv1"].activation == "block1.act1"
    assert set(result.repair_modules) == {
        "stem.1",
        "block1.bn1",
        "block1.bn2",
        "block2.bn1",
        "block2.bn2",
        "block2.shortcut.1",
    }
    perms = Permutations.random(spec, seed=3)
    permuted = perms.apply(model, spec)
    assert not torch.equal(permuted.block1.conv1.weight, model.block1.conv1.weight)
    with torch.no_grad():
        torch.testing.assert_close(permuted(x28(8, 1)), model(x28(8, 1)), rtol=1e-4, atol=1e-5)


def test_vit_residual_stream_mlp_blocks_and_attention_heads_are_groups():
    model = randomise_norms(tiny_vit())
    result = trace(model)  # checks invariance itself, with random per-head permutations
    by_name = {g.name: g for g in result.spec.groups}
    stream = by_name["vit.embeddings.patch_embeddings.projection"]
    assert set(by_name) == {stream.name} | {
        f"vit.layers.{i}.{m}" for i in (0, 1) for m in ("mlp.fc1", "attention.q_proj", "attention.v_proj")
    }
    assert not result.skipped
    assert {
        ("vit.embeddings.cls_token", 2),
        ("vit.embeddings.position_embeddings", 2),
        ("vit.layers.0.layernorm_before.weight", 0),
        ("vit.layers.1.attention.o_proj.bias", 0),
        ("vit.layers.0.attention.q_proj.weight", 1),
        ("vit.layernorm.bias", 0),
        ("classifier.weight", 1),
    } <= set(stream.axes)
    assert stream.activation == "vit.layernorm" and result.unit_axes[stream.name] == {"activation": 2}
    mlp = by_name["vit.layers.0.mlp.fc1"]
    assert set(mlp.axes) == {
        ("vit.layers.0.mlp.fc1.weight", 0),
        ("vit.layers.0.mlp.fc1.bias", 0),
        ("vit.layers.0.mlp.fc2.weight", 1),
    }
    assert (mlp.preactivation, mlp.activation, mlp.blocks) == (
        "vit.layers.0.mlp.fc1",
        "vit.layers.0.mlp.activation_fn",
        1,
    )
    # 2 heads of 8 units: queries and keys share one permutation, values and the output projection another,
    # each permuting units within their head only
    qk, vo = by_name["vit.layers.0.attention.q_proj"], by_name["vit.layers.0.attention.v_proj"]
    assert set(qk.axes) == {(f"vit.layers.0.attention.{p}_proj.{t}", 0) for p in "qk" for t in ("weight", "bias")}
    assert set(vo.axes) == {
        ("vit.layers.0.attention.v_proj.weight", 0),
        ("vit.layers.0.attention.v_proj.bias", 0),
        ("vit.layers.0.attention.o_proj.weight", 1),
    }
    assert qk.blocks == vo.blocks == 2 and qk.size == 16
    perms = Permutations.random(result.spec, seed=1)
    blocks = perms[qk.name].view(2, 8) // 8
    assert (blocks == blocks[:, :1]).all() and not perms.is_identity()  # heads move whole, if at all
    permuted = perms.apply(model, result.spec)
    x = x28(6, 2)
    with torch.no_grad():
        torch.testing.assert_close(permuted(pixel_values=x).logits, model(pixel_values=x).logits, rtol=1e-4, atol=1e-5)
    assert "vit.layers.0.attention.q_proj" not in result.repair_modules


def test_heads_move_whole_and_together_or_not_at_all():
    spec = trace_permutation_spec(tiny_vit())
    q, v = "vit.layers.0.attention.q_proj", "vit.layers.0.attention.v_proj"
    assert (q, v) in spec.couplings
    swap = torch.arange(16).roll(8)  # head 0 <-> head 1, units in order
    mixed = torch.tensor([8] + list(range(1, 8)) + [0] + list(range(9, 16)))  # one unit across heads
    for perms, message in (({v: mixed}, "between its 2 blocks"), ({v: swap}, "move their blocks .heads. alike")):
        with pytest.raises(ValueError, match=message):
            Permutations({**Permutations.identity(spec), **perms}).validate(spec)
    both = Permutations({**Permutations.identity(spec), q: swap, v: swap})
    both.validate(spec)
    model = randomise_norms(tiny_vit())
    x = x28(4, 3)
    with torch.no_grad():
        torch.testing.assert_close(
            both.apply(model, spec)(pixel_values=x).logits, model(pixel_values=x).logits, rtol=1e-4, atol=1e-5
        )


@pytest.mark.parametrize("matcher", ["activation", "weight"])
def test_matchers_undo_a_permutation_of_a_vit_that_moves_heads(matcher):
    model = randomise_norms(tiny_vit(5))
    attach_permutation_spec(model)
    spec = model.permutation_spec()
    scramble = Permutations.random(spec, seed=2)
    sigma = {n: scramble[n].view(2, 8)[:, 0] // 8 for c in spec.couplings for n in c}
    assert any(not torch.equal(s, torch.arange(2)) for s in sigma.values())  # some heads do move
    assert_matcher_undoes(model, scramble.apply(model), matcher)


class SingleHeadAttention(nn.Module):
    """Tokens -> embedding -> one attention head with a residual connection -> mean over tokens -> linear."""

    def __init__(self, d: int = 16, h: int = 8):
        super().__init__()
        self.embed, self.head = nn.Linear(4, d), nn.Linear(d, 3)
        self.q, self.k, self.v, self.o = nn.Linear(d, h), nn.Linear(d, h), nn.Linear(d, h), nn.Linear(h, d)

    def forward(self, x):
        h = self.embed(x)
        attention = torch.softmax(self.q(h) @ self.k(h).transpose(1, 2) / 8**0.5, dim=-1)
        return self.head((h + self.o(attention @ self.v(h))).mean(1))


def test_single_head_attention_ties_query_and_key_units():
    model = SingleHeadAttention()
    spec = trace_permutation_spec(model, torch.randn(2, 5, 4))  # checks invariance itself
    groups = {g.name: set(g.axes) for g in spec.groups}
    assert set(groups) == {"embed", "q", "v"}
    assert {("q.weight", 0), ("k.weight", 0), ("k.bias", 0)} <= groups["q"]
    assert {("o.weight", 0), ("head.weight", 1), ("q.weight", 1)} <= groups["embed"]


def test_invariance_check_names_a_wrong_group():
    model = PermMLPForImageClassification(PermMLPConfig(depth=2, width=16))
    spec = model.permutation_spec()
    broken = type(spec)(
        tuple(
            type(g)(g.name, g.size, g.axes[:1], g.activation, g.preactivation) if g.name == "hidden.1" else g
            for g in spec.groups
        )
    )
    check_permutation_invariance(model, spec)
    with pytest.raises(AssertionError, match=r"\['hidden.1'\]"):
        check_permutation_invariance(model, broken)


# -- refusals -------------------------------------------------------------------------------------------
def test_flatten_of_conv_channels_with_positions_is_refused_naming_the_module():
    model = FlattenCNN()
    with pytest.raises(ValueError, match=r"units produced by 'conv'.*flatten.*merges an axis of size 8"):
        trace(model, x28())
    result = trace(model, x28(), on_unsupported="skip")  # the Linear's hidden units are still a group
    assert [g.name for g in result.spec.groups] == ["hidden"] and set(result.skipped) == {"conv"}


def test_grouped_convolution_permutes_its_outputs_within_groups_and_keeps_its_inputs_in_place():
    model = nn.Sequential(
        nn.Conv2d(1, 8, 3),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, groups=2),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 10),
    )
    result = trace(model, x28())  # checks invariance itself
    assert "2 groups" in result.kept["0"] and "input channels in fixed groups" in result.kept["0"]
    grouped = result.spec["2"]
    assert grouped.blocks == 2 and set(grouped.axes) == {("2.weight", 0), ("2.bias", 0), ("6.weight", 1)}
    scramble = Permutations.random(result.spec, seed=3)
    assert scramble["2"].view(2, 4).div(4, rounding_mode="floor").equal(torch.tensor([[0] * 4, [1] * 4]))


class GroupedCNN(nn.Module):
    """conv-BN-ReLU, a 3x3 conv in 4 groups (3 outputs each), a 1x1 conv, global pool, linear."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 8, 3, bias=False), nn.BatchNorm2d(8), nn.ReLU())
        self.grouped, self.act = nn.Conv2d(8, 12, 3, groups=4), nn.ReLU()
        self.mix, self.act2 = nn.Conv2d(12, 6, 1), nn.ReLU()
        self.classifier = nn.Linear(6, 10)

    def forward(self, pixel_values):
        h = self.act2(self.mix(self.act(self.grouped(self.stem(pixel_values)))))
        return self.classifier(h.mean((2, 3)))


@pytest.mark.parametrize("matcher", ["activation", "weight"])
def test_matchers_undo_a_permutation_within_convolution_groups(matcher):
    model = randomise_norms(GroupedCNN())
    attach_permutation_spec(model, example_inputs=x28())
    assert model.permutation_spec()["grouped"].blocks == 4
    assert_matcher_undoes(model, Permutations.random(model.permutation_spec(), seed=4).apply(model), matcher)


def test_untraceable_inputs_ask_for_example_inputs():
    with pytest.raises(ValueError, match="example_inputs"):
        trace(FlattenCNN())


# -- the traced spec drives the standard matchers -------------------------------------------------------
def test_activation_matching_with_traced_spec_undoes_a_permutation():
    model = ResidualBNCNN().eval()  # default norms: no unit is dead on the data, so the matching is unique
    attach_permutation_spec(model, example_inputs=x28())
    spec = model.permutation_spec()
    assert_matcher_undoes(model, Permutations.random(spec, seed=5).apply(model), n=64, batch_size=64)


def test_activation_matching_undoes_a_permutation_of_a_vit_on_its_token_axis():
    """A ViT's units sit on the last axis of (N, tokens, units) activations: `unit_axis` 2."""
    model = randomise_norms(tiny_vit(3))
    attach_permutation_spec(model, on_unsupported="skip")
    spec = model.permutation_spec()
    assert {g.unit_axis for g in spec.groups} == {2}
    assert_matcher_undoes(model, Permutations.random(spec, seed=4).apply(model))


def test_perm_merger_traces_a_spec_for_saved_vits_and_merges_them(tmp_path):
    """Two transformers ViTs saved as HF folders: PermMerger traces their spec, aligns, REPAIRs, saves."""
    from transformers import AutoModelForImageClassification

    from hf_permerge import PermMerger

    folders = []
    for seed in (0, 1):
        folders.append(tmp_path / f"vit_{seed}")
        randomise_norms(tiny_vit(seed), seed).save_pretrained(folders[-1])
    with pytest.raises(ValueError, match=r"tracing one failed.*example_inputs"):
        PermMerger.from_pretrained(folders, example_inputs=torch.randn(2, 3, 28, 28))  # 3 channels: wrong
    merger = PermMerger.from_pretrained(folders, example_inputs=x28(2, 13))
    assert merger.traced is not None and not merger.traced.skipped
    assert {g.blocks for g in merger.spec.groups} == {1, 2}  # attention heads: permuted within each head
    data = TensorSplit(x28(64, 9), torch.zeros(64, dtype=torch.long), "random")
    perms = merger.align(data, num_examples=64)
    assert set(perms[1]) == set(merger.spec.names)
    x = x28(8, 10)
    with torch.no_grad():  # the permuted net computes what net 1 computes
        torch.testing.assert_close(
            merger.permuted(1)(pixel_values=x).logits, merger.load(1)(pixel_values=x).logits, rtol=1e-4, atol=1e-5
        )
    merged = merger.merge(0.5, repair="repair", repair_data=data, repair_examples=64)
    out = merger.save_pretrained(tmp_path / "merged", model=merged)
    reloaded = AutoModelForImageClassification.from_pretrained(out)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(pixel_values=x).logits, merged(pixel_values=x).logits)
    card = (out / "README.md").read_text()
    assert "REPAIR" in card and "traced from the model's graph; 7 groups permuted" in card


def test_perm_merger_aligns_transformers_resnets_and_resets_their_batchnorm(tmp_path):
    """transformers' ResNet (residual blocks, BatchNorm; its config has no image_size): the spec is traced on
    images of the merge's data set, every group is followable, and reset_bn leaves standardised statistics."""
    from transformers import ResNetConfig, ResNetForImageClassification

    from hf_permerge import PermMerger

    config = ResNetConfig(
        num_channels=1,
        embedding_size=8,
        hidden_sizes=[8, 16],
        depths=[1, 1],
        layer_type="basic",
        downsample_in_first_stage=False,
        num_labels=10,
    )
    folders = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        folders.append(tmp_path / f"resnet_{seed}")
        randomise_norms(ResNetForImageClassification(config), seed).save_pretrained(folders[-1])
    merger = PermMerger.from_pretrained(folders)
    assert not merger.traced.skipped and len(merger.spec.groups) == 4
    data = TensorSplit(x28(64, 11), torch.zeros(64, dtype=torch.long), "random")
    merger.align(data, num_examples=64)
    x = x28(8, 12)
    with torch.no_grad():
        torch.testing.assert_close(
            merger.permuted(1)(pixel_values=x).logits, merger.load(1)(pixel_values=x).logits, rtol=1e-4, atol=1e-5
        )
    plain = merger.merge(0.5)
    reset = merger.merge(0.5, repair="reset_bn", repair_data=data, repair_examples=64)
    bn = "resnet.embedder.embedder.normalization"
    assert not torch.allclose(plain.get_submodule(bn).running_var, reset.get_submodule(bn).running_var)
    stem = reset.resnet.embedder.embedder.convolution(x28(64, 11))
    torch.testing.assert_close(stem.mean((0, 2, 3)), reset.get_submodule(bn).running_mean, rtol=1e-4, atol=1e-4)


class MinorHeadsAttention(nn.Module):
    """Splits its units as (units per head, heads): heads minor. Per-head permutations of consecutive units
    are then wrong; the invariance check finds it and the group is refused (or skipped), not mis-permuted."""

    def __init__(self, d: int = 16, heads: int = 2):
        super().__init__()
        self.heads = heads
        self.embed, self.head = nn.Linear(4, d), nn.Linear(d, 3)
        self.q, self.k, self.v, self.o = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)

    def forward(self, x):
        h = self.embed(x)
        n, t, d = h.shape
        split = lambda y: y.view(n, t, d // self.heads, self.heads).permute(0, 3, 1, 2)  # noqa: E731
        out = torch.nn.functional.scaled_dot_product_attention(split(self.q(h)), split(self.k(h)), split(self.v(h)))
        out = out.permute(0, 2, 3, 1).reshape(n, t, d)
        return self.head((h + self.o(out)).mean(1))


def test_attention_split_with_minor_heads_is_refused_by_the_invariance_check():
    model = MinorHeadsAttention().eval()
    x = torch.randn(2, 5, 4)
    with pytest.raises(ValueError, match=r"cannot be permuted: randomly permuting it changes the model's outputs"):
        trace(model, x)
    result = trace(model, x, on_unsupported="skip")
    assert result.skipped and {g.blocks for g in result.spec.groups} == {1}  # the stream is still a group
    check_permutation_invariance(model, result.spec, x)
