"""Merges never destroy what a user made, refuse what they would silently ignore, and say how to fix it."""

import json
import signal

import pytest
import torch
from transformers import AutoModelForImageClassification

from hf_permerge import cli
from hf_permerge.merging import PermMerger


@pytest.fixture
def merged(tiny_pair):
    """A merger holding a merge, aligned by weight matching (no data: fast)."""
    merger = PermMerger.from_pretrained(tiny_pair)
    merger.align(matcher="weight")
    merger.merge(0.5)
    return merger


def no_alignment(*args, **kwargs):
    raise AssertionError("aligned although the merge does not use the alignment")


def test_save_pretrained_never_deletes_a_users_files(merged, tmp_path):
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "notes.txt").write_text("my notes")
    for overwrite in (False, True):
        with pytest.raises(FileExistsError, match="does not hold a merged model.*new or empty folder"):
            merged.save_pretrained(folder, overwrite=overwrite)
    assert [p.name for p in folder.iterdir()] == ["notes.txt"]
    assert (folder / "notes.txt").read_text() == "my notes"


def test_save_pretrained_replaces_an_earlier_merge_only_with_overwrite(merged, tmp_path):
    out = tmp_path / "merged"
    merged.save_pretrained(out)
    first = (out / "model.safetensors").read_bytes()
    merged.merge(0.25)
    with pytest.raises(FileExistsError, match="already holds a merged model; pass overwrite=True"):
        merged.save_pretrained(out)
    assert (out / "model.safetensors").read_bytes() == first
    merged.save_pretrained(out, overwrite=True)
    assert (out / "model.safetensors").read_bytes() != first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged"]  # no temp or old folder left beside it


def test_save_pretrained_writes_into_an_empty_folder(merged, tmp_path):
    (tmp_path / "empty").mkdir()
    merged.save_pretrained(tmp_path / "empty")
    assert (tmp_path / "empty" / "merge_config.json").is_file()


def test_save_pretrained_redoes_the_last_merge_as_it_was(merged, tmp_path):
    """model=None: the last merge (here vanilla, alpha 0.25) is redone, not a permuted alpha-0.5 merge."""
    expected = merged.merge(0.25, permute=False).state_dict()
    merged.save_pretrained(tmp_path / "out")
    saved = AutoModelForImageClassification.from_pretrained(tmp_path / "out").state_dict()
    assert all(torch.equal(saved[k], expected[k]) for k in expected)


@pytest.mark.parametrize(
    "args, conflict",
    [
        (["--all", "--alpha", "0.3"], "--alpha: not allowed with argument --all"),
        (["--all", "--vanilla", "--permutations", "perms"], "--permutations: not allowed with argument --vanilla"),
    ],
)
def test_cli_merge_refuses_options_it_would_ignore(tiny_pair, tmp_path, capsys, args, conflict, run_cli):
    with pytest.raises(SystemExit) as exit_:
        run_cli("merge", tiny_pair, "-o", tmp_path / "out", *args)
    assert exit_.value.code == 2 and conflict in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "args, message",
    [
        (["--vanilla", "--matcher", "weight"], "--matcher cannot be used with --vanilla"),
        (["--permutations", "perms", "--num-examples", "500"], "--num-examples cannot be used with --permutations"),
    ],
)
def test_cli_merge_refuses_matching_options_that_would_be_ignored(tiny_pair, tmp_path, capsys, args, message, run_cli):
    assert run_cli("merge", tiny_pair, "-o", tmp_path / "out", *args) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("command", ["merge", "align"])
def test_cli_refuses_a_matching_option_of_another_matcher_before_loading(
    tiny_pair, tmp_path, capsys, monkeypatch, run_cli, command
):
    monkeypatch.setattr(PermMerger, "from_pretrained", no_alignment)
    args = ["--matcher", "weight", "--similarity", "l2", "--damping", "0.5"]
    assert run_cli(command, tiny_pair, "-o", tmp_path / "out", *args) == 2
    assert "--similarity, --damping does not apply to --matcher weight" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_cli_passes_the_gradient_matchers_settings(tiny_pair, tmp_path, run_cli):
    args = ["--matcher", "gradient", "--preconditioner", "none", "--damping", "0.5", "--num-examples", "200"]
    assert (
        run_cli("merge", tiny_pair, "--checkpoint", "init", "--align-checkpoint", "init", "-o", tmp_path / "out", *args)
        == 0
    )
    alignment = json.loads((tmp_path / "out" / "merge_config.json").read_text())["alignment"]
    assert alignment["matcher"] == "gradient" and alignment["checkpoint"] == "init"
    assert {"preconditioner": "none", "damping": 0.5, "num_examples": 200}.items() <= alignment["settings"].items()


def test_cli_vanilla_merge_runs_no_alignment(tiny_pair, tmp_path, monkeypatch, run_cli):
    monkeypatch.setattr(PermMerger, "align", no_alignment)
    assert run_cli("merge", tiny_pair, "--vanilla", "-o", tmp_path / "out") == 0
    assert not (tmp_path / "out" / "permutations").exists()


def test_cli_reset_bn_on_an_mlp_names_the_cli_option_before_aligning(tiny_pair, tmp_path, capsys, monkeypatch, run_cli):
    monkeypatch.setattr(PermMerger, "align", no_alignment)
    assert run_cli("merge", tiny_pair, "--repair", "reset_bn", "-o", tmp_path / "out") == 2
    err = capsys.readouterr().err
    assert "no BatchNorm layers" in err and "`--repair repair`" in err
    assert not (tmp_path / "out").exists()


def test_python_reset_bn_on_an_mlp_names_the_python_argument(merged):
    with pytest.raises(ValueError, match="repair='repair'"):
        merged.merge(0.5, repair="reset_bn")


def test_push_checks_the_repo_id_before_the_network(merged, tmp_path, monkeypatch):
    import huggingface_hub

    from hf_permerge.hub import HubError, push_folder_to_hub

    def no_network(*args, **kwargs):
        raise AssertionError("the Hub was called before the repo id was checked")

    monkeypatch.setattr(huggingface_hub.HfApi, "whoami", no_network)
    merged.save_pretrained(tmp_path / "merged")
    with pytest.raises(HubError, match="'bad repo name!!' is not a valid Hub repo id.*namespace/name") as err:
        push_folder_to_hub(tmp_path / "merged", "bad repo name!!", token="hf_not_used")
    assert err.value.reason == "invalid_repo_id"


def test_cli_push_without_a_token_names_the_token_option(merged, tmp_path, monkeypatch, capsys, run_cli):
    from huggingface_hub import constants

    for var in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_OIDC_RESOURCE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no_token_here"))
    merged.save_pretrained(tmp_path / "merged")
    assert run_cli("push", tmp_path / "merged", "alice/x") == 2
    err = capsys.readouterr().err
    assert "no Hugging Face token found" in err and "pass --token" in err and "token=..." not in err


def test_save_permutations_never_deletes_a_users_files(merged, tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("my notes")
    with pytest.raises(FileExistsError, match="does not hold a set of permutations"):
        merged.save_permutations(tmp_path / "mine")
    assert (tmp_path / "mine" / "notes.txt").read_text() == "my notes"
    merged.save_permutations(tmp_path / "perms")
    merged.save_permutations(tmp_path / "perms")  # an earlier alignment of ours is replaced, as before


def test_the_output_folder_of_run_points_to_its_pair(tiny_pair, tmp_path):
    import shutil

    from hf_permerge import PermMerger

    shutil.copytree(tiny_pair, tmp_path / "run_out" / "pair")
    with pytest.raises(FileNotFoundError, match=r"output of `hf-permerge run`.*its pair is .*run_out/pair"):
        PermMerger.from_pretrained(tmp_path / "run_out")


def test_two_runs_nets_keep_distinct_portable_labels():
    """Absolute paths are cut for cards, but never so far that two different models get the same name."""
    from hf_permerge.merging.sources import distinct_labels

    assert distinct_labels(["/a/run1/net_0/final", "/b/run2/net_0/final"]) == ["run1/net_0/final", "run2/net_0/final"]
    assert distinct_labels(["/tmp/x/net_0/final", "/tmp/x/net_1/final"]) == ["net_0/final", "net_1/final"]
    assert distinct_labels(["runs/a", "/abs/model"]) == ["runs/a", "model"]


def test_model_folders_of_another_checkpoint_merge_that_checkpoint(tiny_pair):
    """`[net_0/step-5, net_1/step-5]` merges step 5, not the nets' final weights beside it."""
    merger = PermMerger.from_pretrained([tiny_pair / "net_0" / "step-5", tiny_pair / "net_1" / "step-5"])
    assert merger.default_checkpoint == "step-5"
    at_step = AutoModelForImageClassification.from_pretrained(tiny_pair / "net_0" / "step-5")
    for (name, p), q in zip(merger.load(0).state_dict().items(), at_step.state_dict().values()):
        torch.testing.assert_close(p, q, rtol=0, atol=0, msg=name)
    merger.align(matcher="weight")
    merger.merge(0.5)
    assert merger.alignment["checkpoint"] == "step-5" and merger.merge_settings()["merge"]["checkpoint"] == "step-5"
    with pytest.raises(ValueError, match="different checkpoints"):
        PermMerger.from_pretrained([tiny_pair / "net_0" / "step-5", tiny_pair / "net_1" / "final"])


def test_permutations_of_other_nets_are_refused(tiny_pair, tmp_path):
    import shutil

    three = PermMerger.from_pretrained(tiny_pair)  # the fixture pair has 3 nets
    three.align(matcher="weight")
    three.save_permutations(tmp_path / "perms")
    two = PermMerger.from_pretrained([tiny_pair / "net_0" / "final", tiny_pair / "net_2" / "final"])
    with pytest.raises(ValueError, match="permutations of 3 nets, and this merge has 2"):
        two.load_permutations(tmp_path / "perms")
    # another pair whose folders are named alike (net_0, net_1, net_2) but hold other nets: refused
    other_pair = tmp_path / "other_pair"
    shutil.copytree(tiny_pair, other_pair)
    shutil.rmtree(other_pair / "net_1")
    shutil.copytree(tiny_pair / "net_2", other_pair / "net_1")
    with pytest.raises(ValueError, match=r"found for other nets \(other weights in net 1\)"):
        PermMerger.from_pretrained(other_pair).load_permutations(tmp_path / "perms")
    # the same nets, passed as net folders instead of the pair: accepted
    same = PermMerger.from_pretrained([tiny_pair / f"net_{i}" for i in range(3)])
    same.load_permutations(tmp_path / "perms")
    assert [p == q for p, q in zip(same.permutations, three.permutations)] == [True] * 3


def test_save_pretrained_saves_the_model_the_merge_returned(tiny_pair, tiny_fmnist, tmp_path):
    """A repair on the caller's data cannot be redone from the settings: the returned model itself is saved."""
    from hf_permerge.data.tensors import load_tensors

    merger = PermMerger.from_pretrained(tiny_pair)
    merger.align(matcher="weight")
    test = load_tensors("fashion_mnist", "test", data_dir=tiny_fmnist)
    returned = merger.merge(0.5, repair="repair", repair_data=test, repair_examples=200)
    merger.save_pretrained(tmp_path / "m")
    saved = AutoModelForImageClassification.from_pretrained(tmp_path / "m")
    for (name, p), q in zip(returned.state_dict().items(), saved.state_dict().values()):
        torch.testing.assert_close(p, q, rtol=0, atol=0, msg=name)
    last = merger.merge_settings()["merge"]
    assert last["repair_examples"] == 200 and last["repair_data"] == "given by the caller"


@pytest.mark.parametrize(
    "call,message",
    [
        (lambda m: m.permuted(3), "must name a net 0..2"),
        (lambda m: m.permuted(-1), "must name a net 0..2"),
        (lambda m: m.merge(0.5, other=1.5), "other must name a net"),
        (lambda m: m.merge(0.5, other=0), "net 0 is the reference"),
        (lambda m: m.merge("0.5"), "alpha must be a number"),
        (lambda m: m.merge_all(k=2.0), "k must be in"),
    ],
)
def test_bad_net_indices_and_weights_name_the_valid_range(merged, call, message):
    with pytest.raises(ValueError, match=message):
        call(merged)


def test_merged_config_names_its_architecture(merged, tmp_path):
    import json

    merged.save_pretrained(tmp_path / "m")
    assert json.loads((tmp_path / "m" / "config.json").read_text())["architectures"] == [
        "PermMLPForImageClassification"
    ]


def test_a_new_alignment_forgets_the_merge_made_with_the_old_one(tiny_pair, tmp_path):
    merger = PermMerger.from_pretrained(tiny_pair)
    merger.align(matcher="weight")
    stale = merger.merge(0.3)
    merger.align(matcher="weight", max_iter=1)
    merger.save_pretrained(tmp_path / "m")  # the default merge with the current permutations, not `stale`
    expected = merger.merge(0.5)
    saved = AutoModelForImageClassification.from_pretrained(tmp_path / "m")
    for (name, p), q in zip(expected.state_dict().items(), saved.state_dict().values()):
        torch.testing.assert_close(p, q, rtol=0, atol=0, msg=name)
    assert stale is not expected


def test_main_puts_the_sigterm_handler_back(tmp_path):
    before = signal.getsignal(signal.SIGTERM)
    try:
        assert cli.main(["merge", str(tmp_path / "missing"), "-o", str(tmp_path / "out")]) == 2
        assert signal.getsignal(signal.SIGTERM) is before
    finally:
        signal.signal(signal.SIGTERM, before)


def test_numpy_integers_name_nets(merged):
    import numpy as np

    assert merged.permuted(np.int64(1)) is not None
