"""Streamed weight matching and merging: tensors read from the shards on demand, the merge written shard by shard.

The planted case is the correctness test at every scale: B is a permuted copy of A (permuted by `text_models`'
own hand-written code, not by the tracer's spec), so aligning B onto A must give A's tensors back exactly."""

import copy
import hashlib
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from text_models import logits, planted_permutation, tiny, token_ids
from transformers import AutoConfig, AutoModelForCausalLM

from hf_permerge import shards
from hf_permerge.alignment import PermGroup, PermutationSpec, apply_permutations, solve_linear_matching
from hf_permerge.alignment.repeat import repeat_layers
from hf_permerge.alignment.streamed import match_streamed, objective
from hf_permerge.alignment.tracing import trace
from hf_permerge.io_utils import is_leftover
from hf_permerge.merging import budget
from hf_permerge.merging.checkpoint_spec import checkpoint_spec
from hf_permerge.merging.saving import MARKER
from hf_permerge.merging.streamed import merge_streamed
from hf_permerge.shards import INDEX_NAME, ShardedTensors


def _save(state, model, folder):
    model.load_state_dict(state)
    model.to(torch.bfloat16).save_pretrained(folder, max_shard_size="20KB")


@pytest.fixture(scope="module")
def planted_pair(tmp_path_factory):
    """Folders a and b (sharded, bf16): b is a planted permutation of a."""
    root = tmp_path_factory.mktemp("planted")
    model = tiny("llama").to(torch.bfloat16)
    spec = trace(tiny("llama"), {"input_ids": token_ids()}).spec
    _save(model.state_dict(), model, root / "a")
    _save(planted_permutation(model, seed=3), tiny("llama").to(torch.bfloat16), root / "b")
    return root / "a", root / "b", spec


def test_streamed_weight_matching_undoes_a_planted_permutation(planted_pair):
    a, b, spec = planted_pair
    source_a, source_b = ShardedTensors(a), ShardedTensors(b)
    perms = match_streamed(spec, source_a, source_b, chunk_elements=64)  # a few columns at a time
    state_b = {k: source_b[k] for k in source_b}
    aligned = apply_permutations(spec, state_b, perms)
    for key in source_a:
        assert torch.equal(aligned[key], source_a[key]), key


def test_streamed_objective_equals_the_in_memory_matchers(planted_pair):
    a, b, spec = planted_pair
    source_a, source_b = ShardedTensors(a), ShardedTensors(b)
    streamed = match_streamed(spec, source_a, source_b, bottom_up=False, seed=1)
    perms, sims = solve_linear_matching(
        spec, {k: source_a[k] for k in source_a}, {k: source_b[k] for k in source_b}, seed=1
    )
    assert streamed == perms
    in_memory = sum(float(s[torch.arange(len(p)), p].sum()) for s, p in ((sims[g], perms[g]) for g in sims))
    assert objective(streamed) == pytest.approx(in_memory, rel=1e-5)


def test_spec_traced_on_two_layers_and_repeated_equals_the_spec_traced_on_all(tmp_path):
    for arch in ("llama", "llama_mha", "bert"):  # grouped-query, heads moving within, heads coupled
        small = tiny(arch)
        config = copy.deepcopy(small.config)
        config.num_hidden_layers = 5
        deep = type(small)(config)
        full = trace(deep, {"input_ids": token_ids()}).spec
        repeated = repeat_layers(trace(small, {"input_ids": token_ids()}).spec, 2, 5, deep.state_dict())
        assert repeated.equivalent(full) and repeated.names == full.names
        assert [(g.activation, g.preactivation, g.unit_axis) for g in repeated.groups] == [
            (g.activation, g.preactivation, g.unit_axis) for g in full.groups
        ]


def test_checkpoint_spec_needs_only_the_shapes(planted_pair):
    a, _, traced = planted_pair
    config = AutoConfig.from_pretrained(a)
    config.num_hidden_layers = 7
    with torch.device("meta"):
        shapes = AutoModelForCausalLM.from_config(config).state_dict()
    spec, _ = checkpoint_spec(config, shapes)
    assert len(spec.groups) == 1 + 4 * 7 and spec.groups[0].size == config.hidden_size
    mlp = [g for g in spec.groups[1:] if g.blocks == 1]  # per layer: queries, keys, values (in heads), MLP
    assert {g.size for g in mlp} == {config.intermediate_size} and len(mlp) == 7
    assert len(spec.couplings) == 7


def test_streamed_merge_of_a_planted_pair_is_a_and_loads(planted_pair, tmp_path):
    a, b, _ = planted_pair
    out = merge_streamed(a, b, tmp_path / "merged", max_shard_size="20KB", progress=False, log=lambda _: None)
    merged, source_a = ShardedTensors(out), ShardedTensors(a)
    assert (out / INDEX_NAME).is_file() and (out / "config.json").is_file() and (out / MARKER).is_file()
    for key in source_a:
        assert merged.meta(key) == source_a.meta(key)
        assert torch.equal(merged[key], source_a[key]), key
    model = AutoModelForCausalLM.from_pretrained(out)
    assert torch.equal(logits(model, token_ids()), logits(AutoModelForCausalLM.from_pretrained(a), token_ids()))


def test_streamed_merge_estimates_its_needs_and_says_so(planted_pair, tmp_path):
    a, b, _ = planted_pair
    said = []
    merge_streamed(a, b, tmp_path / "merged", progress=False, log=said.append)
    assert len(said) == 1 and "GiB of memory" in said[0] and " of disk" in said[0]


def test_too_little_memory_is_refused_in_one_line_naming_the_setting(planted_pair, tmp_path, monkeypatch):
    a, b, _ = planted_pair
    monkeypatch.setattr(budget.psutil, "virtual_memory", lambda: SimpleNamespace(available=2**20))
    with pytest.raises(budget.NotEnoughResources, match="memory is available; lower chunk_elements") as err:
        merge_streamed(a, b, tmp_path / "merged", progress=False, log=lambda _: None)
    assert "\n" not in str(err.value)
    assert not (tmp_path / "merged").exists()


def test_too_little_disk_is_refused_in_one_line(planted_pair, tmp_path, monkeypatch):
    a, b, _ = planted_pair
    monkeypatch.setattr(budget.shutil, "disk_usage", lambda path: SimpleNamespace(free=1024, total=2048, used=1024))
    with pytest.raises(budget.NotEnoughResources, match="free; choose an output folder"):
        merge_streamed(a, b, tmp_path / "merged", progress=False, log=lambda _: None)
    assert not (tmp_path / "merged").exists()


def test_the_estimate_grows_with_the_largest_group_and_tensor():
    spec = PermutationSpec((PermGroup("g", 1000, (), None),))
    small = budget.estimate(spec, {"t": 10**6}, 1000)
    assert budget.estimate(spec, {"t": 10**9}, 1000).memory > small.memory
    assert budget.estimate(PermutationSpec((PermGroup("g", 4000, (), None),)), {"t": 10**6}, 1000).memory > small.memory
    assert small.disk == 10**6


def _digest(folder):
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.rglob("*") if p.is_file()
    }


KILLED_MERGE = """
import sys, time
from hf_permerge import shards
write = shards.ShardWriter.write
def slow(self, name, tensor):
    write(self, name, tensor)
    open(sys.argv[4], "w").close()
    time.sleep(120)
shards.ShardWriter.write = slow
from hf_permerge.merging.streamed import merge_streamed
merge_streamed(sys.argv[1], sys.argv[2], sys.argv[3], max_shard_size="20KB", progress=False)
"""


def test_a_killed_streamed_merge_leaves_no_output_and_the_inputs_untouched(planted_pair, tmp_path):
    a, b, _ = planted_pair
    before = _digest(a), _digest(b)
    out, started = tmp_path / "merged", tmp_path / "writing"
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.Popen([sys.executable, "-c", KILLED_MERGE, str(a), str(b), str(out), str(started)], cwd=root)
    try:
        deadline = time.monotonic() + 120
        while not started.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert started.exists(), "the merge never started writing"
        assert any(p.name.startswith(".merged.tmp-") for p in tmp_path.iterdir())  # midway: shards in staging
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert not out.exists()
    assert all(is_leftover(p) or p.name in ("writing", ".merged.lock") for p in tmp_path.iterdir())
    assert (_digest(a), _digest(b)) == before


def test_overwrite_keeps_the_old_merge_until_the_new_one_is_whole(planted_pair, tmp_path, monkeypatch):
    a, b, _ = planted_pair
    out = merge_streamed(a, b, tmp_path / "merged", progress=False, log=lambda _: None)
    before = _digest(out)

    def broken(self, name, tensor):
        raise KeyboardInterrupt

    monkeypatch.setattr(shards.ShardWriter, "write", broken)
    with pytest.raises(KeyboardInterrupt):
        merge_streamed(a, b, out, overwrite=True, progress=False, log=lambda _: None)
    assert _digest(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged"]


def test_streamed_merge_on_the_command_line(planted_pair, tmp_path, run_cli, capsys):
    a, b, _ = planted_pair
    out = tmp_path / "merged"
    assert run_cli("merge", a, b, "--streamed", "--max-shard-size", "20KB", "-o", out) == 0
    said = capsys.readouterr().out
    assert "GiB of memory" in said and f"merged model: {out}" in said
    merged, source_a = ShardedTensors(out), ShardedTensors(a)
    assert len(list(out.glob("*.safetensors"))) > 1
    for key in source_a:
        assert torch.equal(merged[key], source_a[key]), key


@pytest.mark.parametrize(
    "extra, message",
    [
        (("--matcher", "gradient"), "--streamed aligns by weight or activation matching, not gradient"),
        (("--matcher", "activation"), "--streamed --matcher activation reads the models' activations on text"),
        (("--vanilla",), "--vanilla cannot be used with --streamed"),
        (("--checkpoint", "init"), "--checkpoint cannot be used with --streamed"),
    ],
)
def test_streamed_merge_refuses_what_it_cannot_do(planted_pair, tmp_path, run_cli, capsys, extra, message):
    a, b, _ = planted_pair
    assert run_cli("merge", a, b, "--streamed", *extra, "-o", tmp_path / "merged") == 2
    err = capsys.readouterr().err.strip()
    assert message in err and err.count("\n") == 0, err
    assert not (tmp_path / "merged").exists()


# Activation matching at scale: statistics in bounded passes, both models read layer by layer from their shards.


def _tokens(n: int = 16, length: int = 12):
    from hf_permerge.data.tokens import TokenSplit

    ids = token_ids(n, length, seed=5)
    return TokenSplit(ids, torch.ones_like(ids), "planted-test")


def test_statistics_passes_bound_their_memory_and_keep_couplings_together():
    from hf_permerge.alignment.activation import statistics_bytes, statistics_passes

    spec = trace(tiny("llama"), {"input_ids": token_ids()}).spec
    assert statistics_passes(spec, None) == [spec.names]
    bound = max(sum(statistics_bytes(spec[g].size) for g in spec.coupling_of(g) or (g,)) for g in spec.names)
    passes = statistics_passes(spec, bound)
    assert len(passes) > 1 and sorted(g for p in passes for g in p) == sorted(spec.names)
    for p in passes:
        assert sum(statistics_bytes(spec[g].size) for g in p) <= bound
        for g in p:
            assert set(spec.coupling_of(g) or ()) <= set(p)
    with pytest.raises(ValueError, match="more than max_statistics_mb=.*raise max_statistics_mb"):
        statistics_passes(spec, bound - 1)


def test_activation_matching_in_passes_finds_what_one_pass_finds(monkeypatch):
    """Every group's objective, matched and at the identity, is the same whether its statistics were gathered in
    one pass or in several (each pass stopping its forwards early); the planted permutation is undone."""
    from hf_permerge.alignment import activation
    from hf_permerge.alignment.activation import ActivationMatcher
    from hf_permerge.alignment.tracing import attach_permutation_spec

    model = tiny("llama").eval()
    spec = trace(tiny("llama"), {"input_ids": token_ids()}).spec
    other = tiny("llama").eval()
    other.load_state_dict(planted_permutation(model, seed=3))
    a, b = attach_permutation_spec(model, spec), attach_permutation_spec(other, spec)
    one = ActivationMatcher(num_examples=None).match(a, b, _tokens())
    monkeypatch.setattr(
        activation, "statistics_bytes", lambda n: 2**19
    )  # four groups in 2 MiB: an attention layer (three) a pass
    calls = []
    original = activation.activation_statistics
    monkeypatch.setattr(activation, "activation_statistics", lambda *args: calls.append(args[-1]) or original(*args))
    passes = ActivationMatcher(num_examples=None, max_statistics_mb=2).match(a, b, _tokens())
    assert len(calls) > 2 and all(c is not None for c in calls)
    for g in spec.names:
        for key in ("similarity_matched", "similarity_identity"):
            assert passes.info["groups"][g][key] == pytest.approx(one.info["groups"][g][key], rel=1e-6), (g, key)
    with torch.no_grad():
        torch.testing.assert_close(
            logits(passes.apply(b, spec), token_ids()), logits(a, token_ids()), atol=1e-5, rtol=1e-4
        )


def test_offloaded_activation_matching_undoes_a_planted_permutation(planted_pair):
    from hf_permerge.merging.offloaded import match_activations_offloaded, offload_map

    a, b, spec = planted_pair
    perms = match_activations_offloaded(a, b, _tokens(), spec, max_statistics_mb=1, num_examples=None)
    source_a, source_b = ShardedTensors(a), ShardedTensors(b)
    aligned = apply_permutations(spec, {k: source_b[k] for k in source_b}, perms)
    for key in source_a:
        assert torch.equal(aligned[key], source_a[key]), key
    placed = offload_map(tiny("llama"))
    assert placed["model.layers.0"] == placed["model.layers.1"] == "disk" and placed["lm_head"] == "disk"


def test_streamed_activation_merge_of_a_planted_pair_is_a(planted_pair, tmp_path):
    a, b, _ = planted_pair
    lines = []
    out = merge_streamed(a, b, tmp_path / "m", matcher="activation", data=_tokens(), progress=False, log=lines.append)
    merged, source_a = ShardedTensors(out), ShardedTensors(a)
    for key in source_a:
        assert torch.equal(merged[key], source_a[key]), key
    assert "memory" in lines[0]
    with pytest.raises(ValueError, match="pass data"):
        merge_streamed(a, b, tmp_path / "n", matcher="activation", progress=False, log=lines.append)
    assert not (tmp_path / "n").exists()


def test_streamed_activation_merge_on_the_command_line(planted_pair, tmp_path, run_cli, capsys):
    """--streamed --matcher activation on a saved Dataset of input_ids: the planted pair's merge is A."""
    from datasets import Dataset

    a, b, _ = planted_pair
    Dataset.from_dict({"input_ids": token_ids(16, 12, seed=5).tolist()}).save_to_disk(tmp_path / "tokens")
    out = tmp_path / "merged"
    code = run_cli(
        "merge",
        a,
        b,
        "--streamed",
        "--matcher",
        "activation",
        "--dataset",
        tmp_path / "tokens",
        "--max-statistics-mb",
        "1",
        "-o",
        out,
    )
    assert code == 0, capsys.readouterr().err
    merged, source_a = ShardedTensors(out), ShardedTensors(a)
    for key in source_a:
        assert torch.equal(merged[key], source_a[key]), key


@pytest.mark.parametrize("arch", ["gpt2", "phi3"])
def test_streamed_merge_undoes_planted_fused_projections(arch, tmp_path):
    """Fused q/k/v (GPT-2's thirds with its tied LM head stored once, Phi-3's slices and gate|up halves): the two-layer
    traced spec's parts, repeated for every layer, let the streamed merge of a planted pair give A back."""
    config = tiny(arch).config
    config.num_hidden_layers = 3  # more than the two the streamed spec is traced on (GPT-2: n_layer, the same)
    torch.manual_seed(0)
    model = type(tiny(arch))(config)
    _save(model.state_dict(), model, tmp_path / "a")
    _save(planted_permutation(model, seed=5), type(model)(model.config), tmp_path / "b")
    out = merge_streamed(
        tmp_path / "a", tmp_path / "b", tmp_path / "merged", max_shard_size="20KB", progress=False, log=lambda _: None
    )
    merged, source_a = ShardedTensors(out), ShardedTensors(tmp_path / "a")
    for key in source_a:
        assert torch.equal(merged[key], source_a[key]), key
