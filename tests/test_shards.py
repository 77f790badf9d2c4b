"""Weights by name from a model folder's shards, and shards written tensor by tensor as `save_pretrained` writes them."""

import json

import pytest
import torch
from safetensors import safe_open
from text_models import tiny
from transformers import AutoModelForCausalLM

from hf_permerge.shards import INDEX_NAME, WEIGHTS_NAME, ShardedTensors, ShardWriter, parse_size


@pytest.fixture
def sharded_llama(tmp_path):
    model = tiny("llama").to(torch.bfloat16)
    model.save_pretrained(tmp_path / "llama", max_shard_size="20KB")
    return model, tmp_path / "llama"


def test_sharded_folder_reads_every_tensor_by_name(sharded_llama):
    model, folder = sharded_llama
    assert (folder / INDEX_NAME).is_file()
    source = ShardedTensors(folder)
    state = model.state_dict()
    assert set(source) == set(state)
    for name, t in state.items():
        assert source.meta(name) == (tuple(t.shape), torch.bfloat16)
        assert torch.equal(source[name], t)
    emb = "model.embed_tokens.weight"
    assert torch.equal(source.rows(emb, 3, 7), state[emb][3:7])
    assert source.shapes()[emb].device.type == "meta"


def test_single_file_folder_reads_too(tmp_path):
    model = tiny("llama")
    model.save_pretrained(tmp_path / "one")
    source = ShardedTensors(tmp_path / "one")
    assert (tmp_path / "one" / WEIGHTS_NAME).is_file() and not (tmp_path / "one" / INDEX_NAME).exists()
    assert all(torch.equal(source[k], v) for k, v in model.state_dict().items())


def test_folder_without_weights_is_refused(tmp_path):
    with pytest.raises(FileNotFoundError, match="holds no model.safetensors"):
        ShardedTensors(tmp_path)


def test_writer_fills_shards_and_writes_the_index_save_pretrained_writes(sharded_llama, tmp_path):
    model, folder = sharded_llama
    source = ShardedTensors(folder)
    out = tmp_path / "out"
    out.mkdir()
    layout = {name: source.meta(name) for name in source}
    with ShardWriter(out, layout, max_shard_size="20KB") as writer:
        for name in reversed(list(source)):  # any order: each tensor has its place
            writer.write(name, source[name])
    ours, theirs = json.loads((out / INDEX_NAME).read_text()), json.loads((folder / INDEX_NAME).read_text())
    assert ours["metadata"] == theirs["metadata"]
    assert len(set(ours["weight_map"].values())) == len(set(theirs["weight_map"].values())) > 1
    for name, shard in ours["weight_map"].items():
        with safe_open(out / shard, framework="pt") as f:
            assert torch.equal(f.get_tensor(name), source[name])
    (out / "config.json").write_text((folder / "config.json").read_text())
    loaded = AutoModelForCausalLM.from_pretrained(out)
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in model.state_dict().items())


def test_writer_writes_one_file_when_it_fits_and_refuses_what_the_layout_lacks(tmp_path):
    layout = {"a": ((2, 3), torch.float32), "b": ((4,), torch.bfloat16)}
    with ShardWriter(tmp_path, layout) as writer:
        writer.write("a", torch.ones(2, 3))
        with pytest.raises(KeyError, match="not in the layout"):
            writer.write("c", torch.ones(1))
        with pytest.raises(ValueError, match="the layout says"):
            writer.write("b", torch.ones(4))
        writer.write("b", torch.ones(4, dtype=torch.bfloat16))
    assert sorted(p.name for p in tmp_path.iterdir()) == [WEIGHTS_NAME]
    assert torch.equal(ShardedTensors(tmp_path)["b"], torch.ones(4, dtype=torch.bfloat16))


def test_a_writer_closed_before_every_tensor_is_written_says_so(tmp_path):
    writer = ShardWriter(tmp_path, {"a": ((2,), torch.float32), "b": ((2,), torch.float32)})
    writer.write("a", torch.zeros(2))
    with pytest.raises(RuntimeError, match="lack 1 tensors"):
        writer.close()


def test_sizes_read_like_save_pretrained():
    assert parse_size("500MB") == 500 * 10**6 and parse_size("2GiB") == 2 * 2**30 and parse_size(7) == 7
