"""PairTrainer: seeds, engines, resume, several processes, output folder safety."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForImageClassification

from hf_permerge.training import PairTrainer, build_model, engines

ROOT = Path(__file__).parents[1]


def weights(folder):
    return load_file(str(Path(folder) / "model.safetensors"))


def assert_same(a, b, atol=0.0):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], atol=atol, rtol=0), (k, (a[k] - b[k]).abs().max())


def test_pair_folder_layout_and_seeded_inits(tmp_path, tiny_config):
    cfg = tiny_config()
    result = PairTrainer(cfg, tmp_path / "pair", progress=False).train()
    pair = json.loads((tmp_path / "pair" / "pair.json").read_text())
    assert pair["num_nets"] == 2 and pair["checkpoints"] == ["init", "step-5", "final"]
    assert {"config", "seeds", "data", "steps", "versions", "nets"} <= pair.keys()
    assert pair["steps"] == {"per_epoch": 10, "total": 20, "saved": [5]}
    for i in range(2):
        for ck in pair["checkpoints"]:
            model = AutoModelForImageClassification.from_pretrained(tmp_path / "pair" / f"net_{i}" / ck)
            assert model.config.id2label[0] == "T - shirt / top"
        # the saved init is exactly what the seed gives
        assert_same(weights(tmp_path / "pair" / f"net_{i}" / "init"), build_model(cfg, i).state_dict())
    # the nets differ only in seed: different inits, and the data orders differ too
    assert not torch.equal(
        weights(tmp_path / "pair/net_0/init")["layers.0.weight"],
        weights(tmp_path / "pair/net_1/init")["layers.0.weight"],
    )
    assert pair["seeds"][0]["data"] != pair["seeds"][1]["data"]
    assert [m["test"]["acc"] for m in result.metrics] == [n["test"]["acc"] for n in pair["nets"]]
    assert not list((tmp_path / "pair").rglob("resume-step-*"))  # resume points go once a net is final


def test_same_config_same_weights(tmp_path, tiny_config):
    cfg = tiny_config(training={"epochs": 1})
    PairTrainer(cfg, tmp_path / "a", progress=False).train()
    PairTrainer(cfg, tmp_path / "b", progress=False).train()
    assert_same(weights(tmp_path / "a/net_1/final"), weights(tmp_path / "b/net_1/final"))


@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
def test_stacked_engine_equals_per_net_engine(tmp_path, tiny_config, optimizer):
    """One optimiser over stacked parameters equals N independent optimisers (AdamW/SGD are elementwise)."""
    outs = {}
    for engine in ("stacked", "per_net"):
        cfg = tiny_config(
            training={"engine": engine, "optimizer": optimizer, "lr": 0.01 if optimizer == "sgd" else 1e-3}
        )
        PairTrainer(cfg, tmp_path / engine, progress=False).train()
        outs[engine] = [weights(tmp_path / engine / f"net_{i}" / "final") for i in range(2)]
    for a, b in zip(outs["stacked"], outs["per_net"]):
        assert_same(a, b, atol=2e-5)


def test_resume_after_interruption_equals_uninterrupted_run(tmp_path, tiny_config, monkeypatch):
    cfg = tiny_config(training={"epochs": 3})
    PairTrainer(cfg, tmp_path / "full", progress=False).train()

    calls = {"n": 0}
    real_step = engines.StackedEngine.step

    def crashing_step(self, xs, ys):
        calls["n"] += 1
        if calls["n"] == 17:  # mid-way through epoch 2
            raise KeyboardInterrupt
        return real_step(self, xs, ys)

    monkeypatch.setattr(engines.StackedEngine, "step", crashing_step)
    with pytest.raises(KeyboardInterrupt):
        PairTrainer(cfg, tmp_path / "cut", progress=False).train()
    monkeypatch.setattr(engines.StackedEngine, "step", real_step)
    assert (tmp_path / "cut/net_0/resume-step-10").exists() and not (tmp_path / "cut/pair.json").exists()
    with pytest.raises(FileExistsError, match="--resume"):
        PairTrainer(cfg, tmp_path / "cut", progress=False).train()
    PairTrainer(cfg, tmp_path / "cut", resume=True, progress=False).train()
    for i in range(2):
        for ck in ("step-5", "final"):
            assert_same(weights(tmp_path / f"full/net_{i}/{ck}"), weights(tmp_path / f"cut/net_{i}/{ck}"))


def test_resume_of_a_batchnorm_cnn_restores_every_buffer_bit_for_bit(tmp_path, tiny_config, monkeypatch):
    """The resume state holds every tensor of the state (BatchNorm's running statistics and counters too) and
    the generators' states: a CNN killed mid-epoch and resumed ends exactly where an uninterrupted run does."""
    cfg = tiny_config(
        model={"type": "cnn", "layers": "4-avg-8", "batch_norm": True},
        training={"epochs": 3, "optimizer": "sgd", "lr": 0.01},
    )
    PairTrainer(cfg, tmp_path / "full", progress=False).train()

    calls = {"n": 0}
    real_step = engines.PerNetEngine.step

    def crashing_step(self, xs, ys):
        calls["n"] += 1
        if calls["n"] == 17:  # mid-way through epoch 2
            raise KeyboardInterrupt
        return real_step(self, xs, ys)

    monkeypatch.setattr(engines.PerNetEngine, "step", crashing_step)
    with pytest.raises(KeyboardInterrupt):
        PairTrainer(cfg, tmp_path / "cut", progress=False).train()
    monkeypatch.setattr(engines.PerNetEngine, "step", real_step)
    assert (tmp_path / "cut/net_0/resume-step-10/rng_state.safetensors").is_file()
    torch.manual_seed(12345)  # whatever the generators did since, the resume state puts them back
    PairTrainer(cfg, tmp_path / "cut", resume=True, progress=False).train()
    for i in range(2):
        for ck in ("step-5", "final"):
            full, cut = weights(tmp_path / f"full/net_{i}/{ck}"), weights(tmp_path / f"cut/net_{i}/{ck}")
            assert any("running_mean" in k for k in full) and any("num_batches_tracked" in k for k in full)
            assert full.keys() == cut.keys()
            for k in full:
                assert torch.equal(full[k], cut[k]), (i, ck, k)


def test_resume_refuses_a_different_config(tmp_path, tiny_config):
    PairTrainer(tiny_config(training={"epochs": 1}), tmp_path / "p", progress=False).train()
    with pytest.raises(ValueError, match="differs from this config in training.epochs;"):
        PairTrainer(tiny_config(training={"epochs": 2}), tmp_path / "p", resume=True, progress=False).train()


def test_resume_accepts_a_run_config_saved_before_a_key_was_added(tmp_path, tiny_config):
    """A key added to the schema later (here evaluation.precision) takes its default when an older run resumes."""
    import json

    cfg = tiny_config(training={"epochs": 1})
    PairTrainer(cfg, tmp_path / "p", progress=False).train()
    saved = json.loads((tmp_path / "p/run_config.json").read_text())
    del saved["evaluation"]["precision"]
    (tmp_path / "p/run_config.json").write_text(json.dumps(saved))
    PairTrainer(cfg, tmp_path / "p", resume=True, progress=False).train()


def test_resume_refuses_nets_built_by_an_older_default(tmp_path, tiny_config):
    """A CNN run saved before CNNs lost their default biases records `model.bias: null`: its saved nets have
    biases that today's default does not build, so resuming it is refused with the override to use."""
    import json
    import shutil

    cnn = {"type": "cnn", "layers": "4-avg-8"}
    old = tiny_config(model={**cnn, "bias": True}, training={"epochs": 1, "optimizer": "sgd", "lr": 0.01})
    PairTrainer(old, tmp_path / "p", progress=False).train()
    saved = json.loads((tmp_path / "p/run_config.json").read_text())
    saved["model"]["bias"] = None  # what the older version wrote
    (tmp_path / "p/run_config.json").write_text(json.dumps(saved))
    shutil.rmtree(tmp_path / "p/net_1/final")  # as if interrupted
    today = tiny_config(model=cnn, training={"epochs": 1, "optimizer": "sgd", "lr": 0.01})
    with pytest.raises(ValueError, match=r"net_0's saved weights do not match.*--set model.bias=true"):
        PairTrainer(today, tmp_path / "p", resume=True, progress=False).train()


def test_two_processes_give_the_same_weights_as_one(tmp_path, tiny_fmnist):
    """`accelerate launch` with 2 CPU processes (gloo) shares out the nets; the weights are identical."""
    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        f"model: {{type: mlp, depth: 1, width: 32}}\ndata: {{dataset: fashion_mnist, data_dir: {tiny_fmnist}}}\n"
        "training: {num_nets: 2, epochs: 1}\n"
    )
    acc_cfg = tmp_path / "accelerate.yaml"
    acc_cfg.write_text(
        "compute_environment: LOCAL_MACHINE\ndistributed_type: MULTI_GPU\nnum_processes: 2\n"
        "num_machines: 1\nmachine_rank: 0\nmixed_precision: 'no'\nuse_cpu: true\n"
        "main_process_ip: 127.0.0.1\nmain_process_port: 29517\nrdzv_backend: static\nsame_network: true\n"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # same thread count as each launched process: same float sums
    bindir = Path(sys.executable).parent
    two = subprocess.run(
        [
            str(bindir / "accelerate"),
            "launch",
            "--config_file",
            str(acc_cfg),
            str(ROOT / "examples/train_pair.py"),
            "--config",
            str(cfg),
            "--output-dir",
            str(tmp_path / "two"),
        ],
        env=env,
        capture_output=True,
        text=True,
    )
    assert two.returncode == 0, two.stderr[-3000:]
    one = subprocess.run(
        [str(bindir / "hf-permerge"), "-q", "train", str(cfg), "-o", str(tmp_path / "one")],
        env=env,
        capture_output=True,
        text=True,
    )
    assert one.returncode == 0, one.stderr[-3000:]
    for i in range(2):
        assert_same(weights(tmp_path / f"one/net_{i}/final"), weights(tmp_path / f"two/net_{i}/final"))
    assert json.loads((tmp_path / "two/pair.json").read_text())["num_nets"] == 2


def test_output_folder_safety(tmp_path, tiny_config):
    cfg = tiny_config(training={"epochs": 1})
    mine = tmp_path / "users_stuff"
    mine.mkdir()
    (mine / "thesis.tex").write_text("precious")
    with pytest.raises(FileExistsError, match="does not hold a pair of hf_permerge .* choose another --output-dir"):
        PairTrainer(cfg, mine, progress=False).train()
    with pytest.raises(FileExistsError, match="refusing to delete"):
        PairTrainer(cfg, mine, overwrite=True, progress=False).train()
    assert (mine / "thesis.tex").read_text() == "precious"
    (tmp_path / "afile").write_text("x")
    with pytest.raises(NotADirectoryError):
        PairTrainer(cfg, tmp_path / "afile" / "out", progress=False).train()


def test_missing_data_fails_before_writing(tmp_path, tiny_config):
    cfg = tiny_config(data={"data_dir": str(tmp_path / "nowhere")})
    with pytest.raises(FileNotFoundError, match="does not exist"):
        PairTrainer(cfg, tmp_path / "out", progress=False).train()
    assert not (tmp_path / "out").exists()


def test_cli_train_reports_accuracy_and_errors_cleanly(tmp_path, tiny_fmnist):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        f"model: {{type: cnn, layers: 4-avg-8}}\ndata: {{data_dir: {tiny_fmnist}}}\ntraining: {{epochs: 1}}\n"
    )
    exe = str(Path(sys.executable).parent / "hf-permerge")
    ok = subprocess.run([exe, "-q", "train", str(cfg), "-o", str(tmp_path / "p")], capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr[-2000:]
    assert "net 1: test loss" in ok.stdout
    bad = subprocess.run(
        [exe, "train", str(cfg), "-o", str(tmp_path / "q"), "--set", "training.epochz=1"],
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 2 and "training.epochz: unknown key" in bad.stderr and "Traceback" not in bad.stderr
    assert not (tmp_path / "q").exists()


def test_pairs_trained_together_equal_pairs_trained_alone(tmp_path, tiny_config):
    """A sweep's seeds of one cell as one stack of nets: the same weights as one pair at a time."""
    from hf_permerge.training import train_together

    configs = [tiny_config(training={"seed": s}) for s in (3, 4)]
    for c, cfg in enumerate(configs):
        PairTrainer(cfg, tmp_path / f"alone_{c}", progress=False).train()
    results = train_together(
        [PairTrainer(cfg, tmp_path / f"together_{c}", progress=False) for c, cfg in enumerate(configs)]
    )
    assert [r.output_dir.name for r in results] == ["together_0", "together_1"]
    for c in range(2):
        pair = json.loads((tmp_path / f"together_{c}" / "pair.json").read_text())
        assert pair["timings"]["trained_together"] == 2 and pair["config"]["training"]["seed"] == 3 + c
        for i in range(2):
            for ckpt in ("init", "step-5", "final"):
                alone = load_file(tmp_path / f"alone_{c}" / f"net_{i}" / ckpt / "model.safetensors")
                together = load_file(tmp_path / f"together_{c}" / f"net_{i}" / ckpt / "model.safetensors")
                for k in alone:
                    torch.testing.assert_close(together[k], alone[k], rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="differ only in training.seed"):
        train_together(
            [
                PairTrainer(configs[0], tmp_path / "x", progress=False),
                PairTrainer(tiny_config(model={"width": 16}), tmp_path / "y", progress=False),
            ]
        )


def test_pairs_cut_while_trained_together_resume_one_by_one(tmp_path, tiny_config, monkeypatch):
    """A stack interrupted mid-way leaves per-net resume points; each pair then resumes alone (as a sweep's
    `run_cell` does) and ends with the weights of an uninterrupted run."""
    from hf_permerge.training import train_together

    configs = [tiny_config(training={"seed": s, "epochs": 3}) for s in (5, 6)]
    calls = {"n": 0}
    real_step = engines.StackedEngine.step

    def crashing_step(self, xs, ys):
        calls["n"] += 1
        if calls["n"] == 15:  # in epoch 2, after the resume point at step 10
            raise KeyboardInterrupt
        return real_step(self, xs, ys)

    monkeypatch.setattr(engines.StackedEngine, "step", crashing_step)
    with pytest.raises(KeyboardInterrupt):
        train_together([PairTrainer(cfg, tmp_path / f"cut_{c}", progress=False) for c, cfg in enumerate(configs)])
    monkeypatch.setattr(engines.StackedEngine, "step", real_step)
    for c, cfg in enumerate(configs):
        assert (tmp_path / f"cut_{c}/net_1/resume-step-10").exists()
        PairTrainer(cfg, tmp_path / f"cut_{c}", resume=True, progress=False).train()
        PairTrainer(cfg, tmp_path / f"full_{c}", progress=False).train()
        for i in range(2):
            assert_same(
                weights(tmp_path / f"full_{c}/net_{i}/final"), weights(tmp_path / f"cut_{c}/net_{i}/final"), atol=1e-5
            )


def test_resume_allows_other_evaluation_settings(tmp_path, tiny_config):
    """Only model, data and training make the nets; `run --resume` may change how they are measured."""
    PairTrainer(tiny_config(training={"epochs": 1}), tmp_path / "p", progress=False).train()
    PairTrainer(
        tiny_config(training={"epochs": 1}, evaluation={"num_lambdas": 5}), tmp_path / "p", resume=True, progress=False
    ).train()
