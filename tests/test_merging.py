"""PermMerger: the merge formula, permuted inits, N-way averages, sources, saving, CLI."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForImageClassification

from hf_permerge.alignment import Permutations
from hf_permerge.data import load_tensors
from hf_permerge.merging import PermMerger
from hf_permerge.models import PermMLPConfig, PermMLPForImageClassification


@pytest.fixture
def merger(tiny_pair, tiny_fmnist):
    m = PermMerger.from_pretrained(tiny_pair)
    m.align(load_tensors("fashion_mnist", "train", data_dir=tiny_fmnist), num_examples=1000)
    return m


def states_close(a, b, atol=1e-6):
    return all(torch.allclose(a[k].float(), b[k].float(), atol=atol) for k in a)


def test_alignment_is_identity_for_the_reference(merger):
    assert merger.permutations[0].is_identity()
    assert len(merger.permutations) == 3 and not merger.permutations[1].is_identity()


def test_permuted_net_computes_same_function(merger, tiny_fmnist):
    x = load_tensors("fashion_mnist", "test", data_dir=tiny_fmnist).pixel_values[:200]
    for ck in ("final", "init", "step-5"):
        torch.testing.assert_close(
            merger.permuted(2, ck)(pixel_values=x).logits,
            merger.load(2, ck)(pixel_values=x).logits,
            atol=1e-5,
            rtol=1e-5,
        )


def test_merge_endpoints_and_midpoint(merger):
    ref = merger.load(0).state_dict()
    assert states_close(merger.merge(0.0).state_dict(), ref)
    assert states_close(merger.merge(1.0).state_dict(), merger.permuted(1).state_dict())
    mid = merger.merge(0.5).state_dict()
    pi1 = merger.permuted(1).state_dict()
    assert states_close(mid, {k: 0.5 * ref[k] + 0.5 * pi1[k] for k in ref})
    vanilla = merger.merge(0.5, permute=False).state_dict()
    raw1 = merger.load(1).state_dict()
    assert states_close(vanilla, {k: 0.5 * ref[k] + 0.5 * raw1[k] for k in ref})


def test_init_merge_applies_the_trained_permutation_to_the_inits(merger):
    """Paper Fig. 1b: the permutation found after training, applied to the untrained init."""
    p1 = merger.permutations[1]
    expected = p1.apply(merger.load(1, "init").state_dict(), merger.spec)
    assert states_close(merger.merge(1.0, checkpoint="init").state_dict(), expected)


def test_merge_all_is_the_uniform_average_of_aligned_nets(merger):
    states = [merger.permuted(i).state_dict() for i in range(3)]
    avg = merger.merge_all().state_dict()
    assert states_close(avg, {k: sum(s[k] for s in states) / 3 for k in states[0]})
    assert states_close(merger.merge_all(k=2).state_dict(), merger.merge(0.5).state_dict())


def test_set_permutations_gives_perm_at_x(merger, tiny_fmnist):
    """Permutations found at step 5 applied at another checkpoint (the paper's perm@x)."""
    data = load_tensors("fashion_mnist", "train", data_dir=tiny_fmnist)
    at5 = PermMerger.from_pretrained(merger.sources[0].checkpoints["final"].parents[1])
    perms = at5.align(data, checkpoint="step-5", num_examples=1000)
    merger.set_permutations(perms, matcher="activation", checkpoint="step-5")
    assert states_close(
        merger.merge(1.0, "final").state_dict(), perms[1].apply(merger.load(1).state_dict(), merger.spec)
    )


def test_model_list_sources_find_sibling_checkpoints(tiny_pair):
    m = PermMerger.from_pretrained([tiny_pair / "net_0" / "final", tiny_pair / "net_1" / "final"])
    assert m.num_nets == 2 and {"init", "final", "step-5"} <= set(m.sources[1].checkpoints)


def test_bad_sources_get_clear_errors(tmp_path, tiny_pair):
    other = PermMLPForImageClassification(PermMLPConfig(depth=1, width=64))
    other.save_pretrained(tmp_path / "wide")
    with pytest.raises(ValueError, match="different architectures.*width: 32 vs 64"):
        PermMerger.from_pretrained([tiny_pair / "net_0" / "final", tmp_path / "wide"])
    with pytest.raises(ValueError, match="at least two"):
        PermMerger.from_pretrained([tmp_path / "wide"])
    with pytest.raises(ValueError, match="single model"):
        PermMerger.from_pretrained(tmp_path / "wide")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="not a pair folder"):
        PermMerger.from_pretrained(tmp_path / "empty")
    m = PermMerger.from_pretrained(tiny_pair)
    with pytest.raises(RuntimeError, match="align"):
        m.merge()
    with pytest.raises(ValueError, match="no checkpoint 'step-7'"):
        m.load(0, "step-7")


def test_save_pretrained_writes_a_loadable_model_with_permutations(merger, tmp_path):
    merged = merger.merge(0.5, checkpoint="init")
    merger.save_pretrained(tmp_path / "out", merged)
    loaded = AutoModelForImageClassification.from_pretrained(tmp_path / "out")
    assert states_close(loaded.state_dict(), merged.state_dict(), atol=0)
    assert Permutations.load(tmp_path / "out/permutations/net_1.safetensors") == merger.permutations[1]
    settings = json.loads((tmp_path / "out/merge_config.json").read_text())
    assert settings["merge"] == {"alpha": 0.5, "checkpoint": "init", "nets": [0, 1], "permuted": True}
    assert settings["alignment"]["matcher"] == "activation"


def test_cli_align_then_merge(tiny_pair, tmp_path):
    exe = str(Path(sys.executable).parent / "hf-permerge")
    r = subprocess.run(
        [exe, "align", str(tiny_pair), "-o", str(tmp_path / "perms"), "--num-examples", "500"],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert "hidden.0: similarity identity" in r.stdout and (tmp_path / "perms/net_2.safetensors").exists()
    r = subprocess.run(
        [
            exe,
            "merge",
            str(tiny_pair),
            "-o",
            str(tmp_path / "m"),
            "--checkpoint",
            "init",
            "--permutations",
            str(tmp_path / "perms"),
        ],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert AutoModelForImageClassification.from_pretrained(tmp_path / "m").config.model_type == "perm_mlp"
    r = subprocess.run([exe, "merge", str(tiny_pair), "-o", str(tmp_path / "m")], capture_output=True, text=True)
    assert r.returncode == 2 and "--overwrite" in r.stderr
    r = subprocess.run(
        [
            exe,
            "merge",
            str(tiny_pair),
            "-o",
            str(tmp_path / "r"),
            "--repair",
            "repair",
            "--permutations",
            str(tmp_path / "perms"),
        ],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads((tmp_path / "r/merge_config.json").read_text())["merge"]["repair"] == "repair"
    assert "REPAIR" in (tmp_path / "r/README.md").read_text()


def test_loading_nets_draws_no_transformers_bars_and_restores_the_setting(tmp_path, capfd):
    """Our loads hide transformers' "Loading weights" bars (one per net and checkpoint) and leave the
    user's setting as it was."""
    from transformers.utils import logging as hf_logging

    from hf_permerge import PermMerger, PermMLPConfig, PermMLPForImageClassification
    from hf_permerge.models.folders import save_model

    for i in range(2):
        save_model(PermMLPForImageClassification(PermMLPConfig(depth=1, width=8, seed=i)), tmp_path / f"m{i}")
    hf_logging.enable_progress_bar()
    capfd.readouterr()
    PermMerger.from_pretrained([tmp_path / "m0", tmp_path / "m1"]).load(1)
    assert "Loading weights" not in capfd.readouterr().err
    assert hf_logging.is_progress_bar_enabled()


def test_merge_takes_alpha_as_a_zero_dimensional_tensor(tiny_pair):
    from hf_permerge import PermMerger

    merger = PermMerger.from_pretrained(tiny_pair)
    merger.align(matcher="weight")
    by_tensor = merger.merge(torch.tensor(0.25)).state_dict()
    by_float = merger.merge(0.25).state_dict()
    assert all(torch.equal(by_tensor[k], v) for k, v in by_float.items())
    assert merger.merge_settings()["merge"]["alpha"] == 0.25


def test_per_seed_subset_hands_the_training_seed_to_data_matchers_only(tiny_pair, tiny_fmnist):
    """alignment.subset: per_seed matches each seed of a sweep on its own images (the matcher's subset seed is
    the run's training.seed); fixed keeps one subset; the weight matcher reads no data: its seed is untouched."""
    from hf_permerge.config import config_from_dict
    from hf_permerge.reporting.pipeline import align_merger

    def aligned(subset, seed, matcher="activation"):
        cfg = config_from_dict(
            {
                "model": {"type": "mlp", "depth": 1, "width": 32},
                "data": {"dataset": "fashion_mnist", "data_dir": str(tiny_fmnist)},
                "training": {"num_nets": 3, "seed": seed},
                "alignment": {"matcher": matcher, "num_examples": 500, "subset": subset},
            }
        )
        merger = PermMerger.from_pretrained(tiny_pair)
        align_merger(merger, cfg)
        return merger.alignment

    assert aligned("fixed", 3)["settings"]["seed"] == 0
    assert aligned("per_seed", 3)["settings"]["seed"] == 3
    assert aligned("per_seed", 4)["settings"]["seed"] == 4
    assert aligned("per_seed", 3)["examples"] == 500
    assert aligned("per_seed", 3, matcher="weight")["settings"].get("seed", 0) == 0  # its default, untouched
