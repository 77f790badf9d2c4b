"""Merging text transformers through the same API as image classifiers: `PermMerger.from_pretrained([a, b])`.

Model b is model a permuted by the tests' own code (`text_models.planted_permutation`): the aligned merge of the two
must compute a's logits, vanilla averaging must not, and the saved merge loads with its Auto class."""

import json

import pytest
import torch
from text_models import logits, permuted_copy, tiny, token_ids
from transformers import AutoModelForCausalLM, AutoModelForMaskedLM, AutoTokenizer, PreTrainedTokenizerFast

from hf_permerge import PermMerger

AUTO = {"bert": AutoModelForMaskedLM}


def _tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({f"w{i}": i for i in range(96)} | {"[UNK]": 96}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[UNK]")


def _pair(tmp_path, arch, dtype=torch.float32, shard=None):
    a = tiny(arch).eval()
    b = permuted_copy(a)
    for name, m in (("a", a), ("b", b)):
        m.to(dtype).save_pretrained(tmp_path / name, **({"max_shard_size": shard} if shard else {}))
        _tokenizer().save_pretrained(tmp_path / name)
    return [tmp_path / "a", tmp_path / "b"]


@pytest.mark.parametrize("arch", ["gpt2", "llama", "llama_mha", "llama_tied", "qwen2", "bert"])
def test_weight_matched_merge_of_a_planted_permutation_computes_the_original(tmp_path, arch):
    merger = PermMerger.from_pretrained(_pair(tmp_path, arch))
    merger.align(matcher="weight")
    a, ids = merger.load(0), token_ids()
    merged = merger.merge(0.5)
    assert torch.allclose(logits(merged, ids), logits(a, ids), atol=1e-5)
    vanilla = merger.merge(0.5, permute=False)
    assert (logits(vanilla, ids) - logits(a, ids)).abs().max() > 1e-2


def test_sharded_bf16_pair_merges_to_bf16_and_the_saved_merge_loads_and_generates(tmp_path):
    merger = PermMerger.from_pretrained(_pair(tmp_path, "llama", torch.bfloat16, shard="30KB"))
    assert (tmp_path / "a" / "model.safetensors.index.json").is_file()
    merger.align(matcher="weight")
    merged = merger.merge(0.5)
    a = merger.load(0)
    assert merged.dtype == torch.bfloat16
    for key, t in a.state_dict().items():  # (a + a) / 2 in fp32, back to bf16: a's own bits
        assert torch.equal(merged.state_dict()[key], t), key
    out = merger.save_pretrained(tmp_path / "merged")
    loaded = AutoModelForCausalLM.from_pretrained(out)
    assert loaded.dtype == torch.bfloat16
    assert isinstance(AutoTokenizer.from_pretrained(out), PreTrainedTokenizerFast)
    generated = loaded.generate(token_ids()[:1, :4], max_new_tokens=3, do_sample=False)
    assert generated.shape == (1, 7)
    card = (out / "README.md").read_text()
    assert "pipeline_tag: text-generation" in card and "AutoModelForCausalLM.from_pretrained" in card
    assert "weight matching reads only the weights" in card
    assert json.loads((out / "merge_config.json").read_text())["sources"] == ["a", "b"]


def test_masked_lm_merge_loads_with_its_auto_class(tmp_path):
    merger = PermMerger.from_pretrained(_pair(tmp_path, "bert"))
    merger.align(matcher="weight")
    merger.merge(0.5)
    out = merger.save_pretrained(tmp_path / "merged")
    loaded = AutoModelForMaskedLM.from_pretrained(out)
    assert torch.allclose(logits(loaded, token_ids()), logits(merger.load(0), token_ids()), atol=1e-5)
    assert "pipeline_tag: fill-mask" in (out / "README.md").read_text()


@pytest.mark.parametrize(
    "arch", ["llama_mha", "llama", "llama_mqa", "qwen2", "qwen3", "phi3", "gpt_neox", "gpt2", "bert"]
)
def test_activation_matching_on_a_dataset_of_input_ids_undoes_a_planted_permutation(tmp_path, arch):
    from datasets import Dataset

    ids = token_ids(n=24, length=12, seed=3)
    mask = torch.ones_like(ids)
    mask[::3, 8:] = 0  # padded rows: statistics skip them
    data = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": mask.tolist()})
    merger = PermMerger.from_pretrained(_pair(tmp_path, arch))
    merger.align(data, matcher="activation")
    a = merger.load(0)
    merged = merger.merge(0.5)
    assert torch.allclose(logits(merged, ids), logits(a, ids), atol=1e-4)


def test_activation_matching_reads_a_text_column_through_the_saved_tokenizer(tmp_path):
    from datasets import Dataset

    texts = [" ".join(f"w{(7 * i + j) % 90}" for j in range(10)) for i in range(20)]
    merger = PermMerger.from_pretrained(_pair(tmp_path, "llama"))
    perms = merger.align(Dataset.from_dict({"verse": texts}), text_column="verse")
    merged = merger.merge(0.5)
    assert torch.allclose(logits(merged, token_ids()), logits(merger.load(0), token_ids()), atol=1e-4)
    assert perms[1].info["data"]["num_examples"] == 20


def test_text_data_without_its_columns_or_too_long_is_refused_in_one_line(tmp_path):
    from datasets import Dataset

    merger = PermMerger.from_pretrained(_pair(tmp_path, "llama"))
    with pytest.raises(ValueError, match=r"no 'input_ids' or 'text' column; its columns are \['words'\]"):
        merger.align(Dataset.from_dict({"words": ["w1 w2"]}))
    with pytest.raises(ValueError, match="longer than the models' 32 positions"):
        merger.align(Dataset.from_dict({"input_ids": [[1] * 40]}))
    with pytest.raises(ValueError, match="outside the models' vocabulary"):
        merger.align(Dataset.from_dict({"input_ids": [[1, 500]]}))
    with pytest.raises(ValueError, match="text models have no default data set"):
        merger.align()


@pytest.mark.parametrize("arch", ["llama", "bert"])
def test_held_out_loss_curve_has_no_permuted_barrier_for_a_planted_permutation(tmp_path, arch):
    from hf_permerge.data.tokens import TokenSplit
    from hf_permerge.evaluation.text import text_curves

    ids = token_ids(n=8, length=12, seed=5)
    split = TokenSplit(ids, torch.ones_like(ids), "test")
    merger = PermMerger.from_pretrained(_pair(tmp_path, arch))
    if arch == "bert":
        merger._nets.tokenizer().add_special_tokens({"mask_token": "w95"})
    merger.align(matcher="weight")
    curves = text_curves(merger, split, num_lambdas=5)
    assert curves["barrier"]["permuted"] == pytest.approx(0, abs=1e-4)  # the same function all along
    # random nets: the vanilla average is another function (its barrier may still be 0: averaging random logits
    # brings them nearer the uniform guess), the permuted one is the same net
    assert abs(curves["vanilla"]["loss"][2] - curves["permuted"]["loss"][2]) > 1e-3
    assert curves["permuted"]["loss"] == pytest.approx([curves["permuted"]["loss"][0]] * 5, abs=1e-4)
    assert curves["vanilla"]["loss"][0] == pytest.approx(curves["permuted"]["loss"][0])


def test_barrier_of_a_text_model_with_itself_is_zero(tmp_path):
    from hf_permerge.data.tokens import TokenSplit
    from hf_permerge.evaluation.text import text_curves

    a = tiny("gpt2").eval()
    for name in ("a", "b"):
        a.save_pretrained(tmp_path / name)
    merger = PermMerger.from_pretrained([tmp_path / "a", tmp_path / "b"])
    merger.align(matcher="weight")
    ids = token_ids(n=4, length=10)
    curves = text_curves(merger, TokenSplit(ids, torch.ones_like(ids), "t"), num_lambdas=3)
    assert curves["barrier"] == {"vanilla": pytest.approx(0, abs=1e-5), "permuted": pytest.approx(0, abs=1e-5)}
