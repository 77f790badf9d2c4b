"""The table of supported architectures in docs/ARCHITECTURES.md is what benchmarks/architectures.py produces now."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from hf_permerge.alignment.tracing import trace

ROOT = Path(__file__).resolve().parents[1]


def load_script():
    spec = importlib.util.spec_from_file_location("architectures", ROOT / "benchmarks" / "architectures.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclass looks its module up
    spec.loader.exec_module(module)
    return module


SCRIPT = load_script()


def test_committed_architecture_table_is_what_tracing_gives_now():
    script = SCRIPT
    text = script.DOC.read_text()
    committed = text[text.index(script.BEGIN) : text.index(script.END) + len(script.END)]
    assert committed == script.render([script.run_arch(a) for a in script.ARCHS]), (
        f"docs/ARCHITECTURES.md's table is stale: run `{script.COMMAND}`"
    )


def traced(name: str, **kwargs):
    model, inputs = SCRIPT.build(name)
    return model, trace(model, inputs, on_unsupported="skip", **kwargs)


def stream_keys(result) -> set[str]:
    return {k for k, _ in result.spec.groups[0].axes}


def test_phi_partial_rotary_moves_whole_query_key_heads_and_value_units_within_heads():
    model, result = traced("Phi")  # rotary on half of each head's units: sliced, rotated, concatenated back
    assert not result.skipped and not result.kept
    heads = model.config.num_attention_heads
    qk, values = result.spec["model.layers.0.self_attn.q_proj"], result.spec["model.layers.0.self_attn.v_proj"]
    assert (qk.blocks, qk.rigid, values.blocks, values.rigid) == (heads, True, heads, False)
    assert (qk.name, values.name) in result.spec.couplings
    assert "model.embed_tokens.weight" in stream_keys(result) and "lm_head.weight" in stream_keys(result)


@pytest.mark.parametrize(
    "name, embeddings, head",
    [
        ("RoBERTa", "roberta.embeddings", "lm_head.decoder.weight"),
        ("DistilBERT", "distilbert.embeddings", "vocab_projector.weight"),
    ],
)
def test_masked_lm_residual_stream_is_permuted_from_embeddings_to_head(name, embeddings, head):
    model, result = traced(name)
    assert not result.skipped and not result.kept
    keys = stream_keys(result)
    assert {f"{embeddings}.word_embeddings.weight", f"{embeddings}.position_embeddings.weight", head} <= keys
    assert result.spec.groups[0].size == 32 and len(result.spec.couplings) == 2


class Padded(nn.Module):
    """conv -> pad -> conv: `pad` pads the spatial positions (the channels pass) or, with `channels`, the channels."""

    def __init__(self, channels: bool = False):
        super().__init__()
        self.channels = channels
        self.a, self.b = nn.Conv2d(3, 8, 3), nn.Conv2d(8 + 2 * channels, 8, 3)
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        h = torch.relu(self.a(x))
        h = F.pad(h, (0, 0, 0, 0, 1, 1) if self.channels else (1, 2, 0, 1), value=0.5)
        return self.head(torch.relu(self.b(h)).mean((2, 3)))


class Rolled(nn.Module):
    """conv -> roll along the positions (Swin's shifted windows) or, with `dims=1`, along the channels -> conv."""

    def __init__(self, dims=(2, 3)):
        super().__init__()
        self.dims = dims
        self.a, self.b, self.head = nn.Conv2d(3, 8, 3), nn.Conv2d(8, 8, 3), nn.Linear(8, 4)

    def forward(self, x):
        h = torch.roll(torch.relu(self.a(x)), shifts=(1, -2) if self.dims != 1 else 3, dims=self.dims)
        return self.head(torch.relu(self.b(h)).mean((2, 3)))


def x_small(seed: int = 0):
    return torch.randn(2, 3, 10, 10, generator=torch.Generator().manual_seed(seed))


def test_padding_positions_passes_the_channels_and_padding_channels_is_refused():
    result = trace(Padded().eval(), x_small())
    assert [g.name for g in result.spec.groups] == ["a", "b"]
    with pytest.raises(ValueError, match=r"units produced by 'a'.*pad .* pads a group's axis"):
        trace(Padded(channels=True).eval(), x_small())
    _, mobilenet = traced("MobileNetV2")  # TF-style "same" padding before every strided / depthwise conv
    assert not mobilenet.skipped and not mobilenet.kept


def test_rolling_positions_passes_the_channels_and_rolling_channels_is_refused():
    assert [g.name for g in trace(Rolled().eval(), x_small()).spec.groups] == ["a", "b"]
    with pytest.raises(ValueError, match=r"units produced by 'a'.*roll .* moves a group's units cyclically"):
        trace(Rolled(dims=1).eval(), x_small())


def test_swin_windows_trace_and_heads_with_a_relative_position_bias_stay_in_place():
    model, result = traced("Swin")  # shifted windows (roll, pad, window partition reshapes) pass the channels
    assert not result.skipped
    assert "downsample" in result.kept["swin.embeddings.patch_embeddings.projection"]  # patch merging: cat of 4
    heads = [g for g in result.spec.groups if g.blocks > 1]
    assert len(heads) == 2 * sum(model.config.depths)  # query/key and value units, permuted within each head
    # each head has its own relative position bias (the attention mask): heads are not even proposed to move
    _, unchecked = traced("Swin", check=False)
    assert not unchecked.spec.couplings


def test_regnet_grouped_convolutions_permute_within_their_groups():
    model, result = traced("RegNet")
    assert not result.skipped
    for stage, groups in ((0, 2), (1, 4)):  # group width 4: 8 and 16 channels
        block = f"regnet.encoder.stages.{stage}.layers.0.layer"
        assert result.spec[f"{block}.1.convolution"].blocks == groups  # SE and the next 1x1 conv follow
        assert "fixed groups" in result.kept[f"{block}.0.convolution"]
    assert SCRIPT.permuted_share(result.spec, model.state_dict()) > 0.9
