"""The bad model folders and data files of the battery (tests/test_bad_input_text.py): each case damages a copy of a
tiny LLaMA pair (A, and B its planted permutation) or writes a bad data file, and says what the one-line refusal
must name. Written by hand from the issue's list, one function per fault."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from text_models import permuted_copy, tiny

KEY = "model.layers.0.self_attn.o_proj.weight"
INDEX = "model.safetensors.index.json"


def tokenizer(names=None):
    """A word-level tokenizer of the models' 97 ids (`names`: other tokens for some ids)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"w{i}": i for i in range(96)} | {"[UNK]": 96}
    if names:
        vocab = {names.get(i, t): i for t, i in vocab.items()}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[UNK]")


def save_pair(root: Path) -> dict[str, Path]:
    """a, b (one file each) and as, bs (the same, sharded), each with the tokenizer."""
    a = tiny("llama").eval()
    b = permuted_copy(a)
    out = {}
    for name, model, shard in (("a", a, None), ("b", b, None), ("as", a, "30KB"), ("bs", b, "30KB")):
        model.save_pretrained(root / name, **({"max_shard_size": shard} if shard else {}))
        tokenizer().save_pretrained(root / name)
        out[name] = root / name
    return out


def _edit_weights(folder: Path, change, shard: str | None = None) -> None:
    path = folder / (shard or "model.safetensors")
    state = load_file(path)
    change(state)
    save_file(state, path, metadata={"format": "pt"})


def _edit_json(path: Path, change) -> None:
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


def _shard_of(folder: Path, key: str = KEY) -> str:
    return json.loads((folder / INDEX).read_text())["weight_map"][key]


_MARK = "open({!r}, 'w').write('ran')\n"
"""A folder's code that leaves a mark beside it when it runs (transformers imports a copy from its cache)."""


def config_auto_map(b: Path) -> None:
    (b / "configuration_evil.py").write_text(_MARK.format(str(b / "code.ran")))
    _edit_json(b / "config.json", lambda d: d.update(auto_map={"AutoConfig": "configuration_evil.EvilConfig"}))


def tokenizer_auto_map(b: Path) -> None:
    (b / "tokenization_evil.py").write_text(_MARK.format(str(b / "code.ran")))
    _edit_json(
        b / "tokenizer_config.json", lambda d: d.update(auto_map={"AutoTokenizer": [None, "tokenization_evil.Evil"]})
    )


def missing_tensor(b: Path) -> None:
    _edit_weights(b, lambda s: s.pop(KEY))


def missing_tensor_sharded(b: Path) -> None:  # the index still maps it to its shard
    _edit_weights(b, lambda s: s.pop(KEY), _shard_of(b))


def missing_tensor_sharded_unindexed(b: Path) -> None:
    _edit_weights(b, lambda s: s.pop(KEY), _shard_of(b))
    _edit_json(b / INDEX, lambda d: d["weight_map"].pop(KEY))


def wrong_shape(b: Path) -> None:
    _edit_weights(b, lambda s: s.update({KEY: torch.zeros(32, 31)}))


def unexpected_tensor(b: Path) -> None:
    _edit_weights(b, lambda s: s.update({"model.extra.weight": torch.zeros(3)}))


def truncated(b: Path) -> None:
    path = b / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-1000])


def bad_header_length(b: Path) -> None:
    path = b / "model.safetensors"
    path.write_bytes((10**12).to_bytes(8, "little") + path.read_bytes()[8:])


def bad_header_json(b: Path) -> None:
    path = b / "model.safetensors"
    raw = bytearray(path.read_bytes())
    raw[8:12] = b"{{{{"
    path.write_bytes(bytes(raw))


def index_wrong_shard(b: Path) -> None:
    other = sorted(set(json.loads((b / INDEX).read_text())["weight_map"].values()) - {_shard_of(b)})[0]
    _edit_json(b / INDEX, lambda d: d["weight_map"].update({KEY: other}))


def index_missing_shard(b: Path) -> None:
    (b / _shard_of(b)).unlink()


def no_config(b: Path) -> None:
    (b / "config.json").unlink()


def config_not_json(b: Path) -> None:
    (b / "config.json").write_text('{"model_type": "llama",')


def config_wrong_type(b: Path) -> None:
    _edit_json(b / "config.json", lambda d: d.update(hidden_size="sixty-four"))


def config_no_model_type(b: Path) -> None:
    _edit_json(b / "config.json", lambda d: d.pop("model_type"))


def nan_weights(b: Path) -> None:
    _edit_weights(b, lambda s: s[KEY].view(-1).__setitem__(0, float("nan")))


def inf_weights(b: Path) -> None:
    _edit_weights(b, lambda s: s["model.layers.1.mlp.up_proj.weight"].view(-1).__setitem__(5, float("inf")))


def other_tokenizer(b: Path) -> None:
    for f in ("tokenizer.json", "tokenizer_config.json"):
        (b / f).unlink()
    tokenizer({i: f"x{i}" for i in range(43)}).save_pretrained(b)


def other_architecture(b: Path) -> None:
    shutil.rmtree(b)
    tiny("llama", rms_norm_eps=1e-5).save_pretrained(b)
    tokenizer().save_pretrained(b)


FOLDER_CASES = {
    # name: (fault, sharded B, what the line names on every path)
    "config_auto_map": (config_auto_map, False, "names custom code"),
    "tokenizer_auto_map": (tokenizer_auto_map, False, "names custom code"),
    "missing_tensor": (missing_tensor, False, f"{KEY} is missing from"),
    "missing_tensor_sharded": (missing_tensor_sharded, True, f"maps {KEY} to"),
    "missing_tensor_sharded_unindexed": (missing_tensor_sharded_unindexed, True, f"{KEY} is missing from"),
    "wrong_shape": (wrong_shape, False, KEY),
    "unexpected_tensor": (unexpected_tensor, False, "model.extra.weight"),
    "truncated": (truncated, False, "it is truncated"),
    "bad_header_length": (bad_header_length, False, "header length"),
    "bad_header_json": (bad_header_json, False, "header is not valid JSON"),
    "index_wrong_shard": (index_wrong_shard, True, "which lacks it (it is in"),
    "index_missing_shard": (index_missing_shard, True, "names shards that are not there"),
    "no_config": (no_config, False, "config.json"),
    "config_not_json": (config_not_json, False, "config.json is not valid JSON"),
    "config_wrong_type": (config_wrong_type, False, "hidden_size is 'sixty-four'"),
    "config_no_model_type": (config_no_model_type, False, "names no model_type"),
    "nan_weights": (nan_weights, False, "holds NaN or inf"),
    "inf_weights": (inf_weights, False, "holds NaN or inf"),
    "other_tokenizer": (other_tokenizer, False, "the tokenizers of"),
    "other_architecture": (other_architecture, False, "rms_norm_eps"),
}


def _dataset(folder: Path, columns: dict) -> Path:
    import datasets

    datasets.Dataset.from_dict(columns).save_to_disk(str(folder))
    return folder


DATA_CASES = {
    # name: (write the data at `path` and return it, what the line names)
    "empty_txt": (lambda p: _write(p / "d.txt", ""), "holds no examples"),
    "blank_txt": (lambda p: _write(p / "d.txt", "\n\n  \n"), "holds no examples"),
    "text_of_empty_rows": (lambda p: _write(p / "d.jsonl", '{"text": ""}\n{"text": " "}\n'), "holds no text"),
    "empty_jsonl": (lambda p: _write(p / "d.jsonl", ""), "d.jsonl"),
    "malformed_jsonl": (lambda p: _write(p / "d.jsonl", '{"text": "w1 w2"\n'), "could not read"),
    "binary_txt": (lambda p: _write(p / "d.txt", bytes(range(256)) * 4), "could not read"),
    "empty_csv": (lambda p: _write(p / "d.csv", ""), "d.csv"),
    "saved_without_input_ids": (lambda p: _dataset(p / "ds", {"foo": [1, 2]}), "'input_ids' or 'text' column"),
    "saved_empty": (lambda p: _dataset(p / "ds", {"input_ids": []}), "holds no examples"),
    "input_ids_as_strings": (lambda p: _dataset(p / "ds", {"input_ids": ["1 2 3", "4 5"]}), "holds str values"),
    "negative_token_ids": (lambda p: _dataset(p / "ds", {"input_ids": [[1, -3, 4], [5, 6]]}), "is negative"),
}


def _write(path: Path, content) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content) if isinstance(content, bytes) else path.write_text(content)
    return path
