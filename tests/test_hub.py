"""Sharing on the Hub, against a Hub-compatible endpoint on 127.0.0.1 (tests/fake_hub.py).

The client under test is the real `huggingface_hub` (and `transformers` on top of it). Both read
`HF_ENDPOINT` once, at import, so the round trips through `transformers` run in a fresh interpreter:
this file run as a script (`python tests/test_hub.py SCENARIO ARGS_JSON`) with HF_ENDPOINT / HF_HOME /
HF_TOKEN set by `run_client`, which also checks that the token never shows in its output (debug
logging on) nor in its HF_HOME. The error paths run in this process, pointing our functions at the
endpoint explicitly (`endpoint=`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from fake_hub import FakeHub

TOKEN = "hf_FakeTokenForTests_7f3a9c2e51"
BAD_TOKEN = "hf_RevokedTokenForTests_0b8d41"
USER = "alice"
RESULT = "RESULT: "


# ---- helpers (pytest side) ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def hub():
    with FakeHub(tokens={TOKEN: USER}) as served:
        yield served


def run_client(scenario: str, args: dict, tmp_path: Path, endpoint: str) -> dict:
    """Run a scenario in a fresh interpreter pointed at `endpoint`; returns its result dict."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")
    }
    env.update(
        HF_ENDPOINT=endpoint,
        HF_HOME=str(tmp_path / "hf_home"),
        HF_TOKEN=TOKEN,
        HF_DEBUG="1",
        HF_HUB_DISABLE_TELEMETRY="1",
        HF_HUB_DISABLE_PROGRESS_BARS="1",
    )
    proc = subprocess.run(
        [sys.executable, __file__, scenario, json.dumps(args)],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-6000:]
    for secret in (TOKEN, BAD_TOKEN):
        assert secret not in output, "a token was printed or logged"
    assert not any(
        secret in p.read_text(errors="ignore")
        for p in (tmp_path / "hf_home").rglob("*")
        if p.is_file() and p.stat().st_size < 1_000_000
        for secret in (TOKEN, BAD_TOKEN)
    ), "a token was written to disk"
    lines = [line for line in proc.stdout.splitlines() if line.startswith(RESULT)]
    return json.loads(lines[-1][len(RESULT) :])


def tree_digest(folder: Path) -> dict[str, str]:
    return {
        p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def closed_port_endpoint() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"


def fake_report() -> dict:
    lambdas = [0.0, 0.25, 0.5, 0.75, 1.0]
    return {
        "endpoints": [{"test": {"loss": 0.35, "acc": 0.88}}, {"test": {"loss": 0.36, "acc": 0.875}}],
        "curves": {
            "final": {
                "vanilla": {
                    "lambdas": lambdas,
                    "test": {"loss": [0.35, 0.9, 1.6, 0.9, 0.36], "acc": [0.88, 0.7, 0.41, 0.7, 0.875]},
                },
                "permuted": {
                    "lambdas": lambdas,
                    "test": {"loss": [0.35, 0.4, 0.45, 0.4, 0.36], "acc": [0.88, 0.86, 0.8525, 0.86, 0.875]},
                },
            }
        },
        "barrier": {
            "final": {
                "vanilla": {"test": {"loss": 1.2450, "acc": 0.4675}},
                "permuted": {"test": {"loss": 0.0950, "acc": 0.0250}},
            }
        },
    }


def card_info() -> dict:
    return {
        "base_models": ["alice/fmnist-mlp-seed0", {"name": "runs/pair/net_1/final", "hub": False}],
        "repo_id": "alice/fmnist-merged",
        "dataset": "fashion_mnist",
        "architecture": "mlp",
        "matcher": {"name": "activation", "similarity": "cosine"},
        "checkpoint": "final",
        "alpha": 0.5,
        "command": "hf-permerge merge runs/pair --output-dir runs/merged",
        "plots": ["plots/interpolation.png"],
        "report": fake_report(),
    }


def write_merged_folder(folder: Path) -> None:
    """What a merge run writes: model, image processor, permutations, report, a plot, the card."""
    import torch
    from safetensors.torch import save_file

    from hf_permerge import PermMLPConfig, PermMLPForImageClassification
    from hf_permerge.data import DATASETS
    from hf_permerge.merging.model_card import render_model_card
    from hf_permerge.models.image_processing_perm import image_processor_for

    config = PermMLPConfig(depth=1, width=16, seed=3, id2label=dict(enumerate(DATASETS["fashion_mnist"].class_names)))
    model = PermMLPForImageClassification(config)
    model.save_pretrained(folder)
    image_processor_for(config).save_pretrained(folder)
    save_file(
        {"hidden.0": torch.randperm(16, generator=torch.Generator().manual_seed(0))},
        folder / "permutations.safetensors",
    )
    (folder / "report.json").write_text(json.dumps(fake_report()))
    (folder / "plots").mkdir()
    (folder / "plots" / "interpolation.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)))
    render_model_card(card_info()).save(folder / "README.md")


def write_pair_folder(folder: Path) -> None:
    """What PairTrainer writes: net_{0,1}/{init,final}/ model folders and pair.json."""
    from hf_permerge import PermMLPConfig, PermMLPForImageClassification

    for net in (0, 1):
        for checkpoint in ("init", "final"):
            PermMLPForImageClassification(PermMLPConfig(depth=1, width=8, seed=net)).save_pretrained(
                folder / f"net_{net}" / checkpoint
            )
    (folder / "pair.json").write_text(json.dumps({"num_nets": 2, "seeds": [0, 1], "dataset": "fashion_mnist"}))
    (folder / ".cache").mkdir()  # hidden entries (e.g. huggingface_hub's local-dir metadata) stay local
    (folder / ".cache" / "junk").write_text("x")


@pytest.fixture(scope="module")
def published(hub, tmp_path_factory):
    """Push a merged-model folder and a pair folder, then pull them back with the ecosystem clients.

    One fresh interpreter does both round trips (importing torch and transformers once)."""
    import PIL.Image

    from hf_permerge.data.loading import load_idx_arrays

    tmp = tmp_path_factory.mktemp("hub_round_trip")
    arrays = load_idx_arrays("fashion_mnist", "test")
    if arrays is None:
        pytest.skip("Fashion-MNIST IDX files not installed (`make data`)")
    PIL.Image.fromarray(arrays[0][0]).save(tmp / "fmnist_test_0.png")
    write_merged_folder(tmp / "merged")
    write_pair_folder(tmp / "pair")
    before = {name: tree_digest(tmp / name) for name in ("merged", "pair")}
    result = run_client(
        "publish",
        {
            "merged": str(tmp / "merged"),
            "merged_repo": "alice/fmnist-merged",
            "image": str(tmp / "fmnist_test_0.png"),
            "pair": str(tmp / "pair"),
            "pair_repo": "fmnist-pair",
        },
        tmp,
        hub.url,
    )
    return {"tmp": tmp, "before": before, **result}


# ---- tests -------------------------------------------------------------------------------------------


def test_push_leaves_the_local_folders_untouched(published):
    for name, digest in published["before"].items():
        assert tree_digest(published["tmp"] / name) == digest, f"pushing modified {name}/"


def test_merged_model_is_pushed_in_one_commit(hub, published):
    repo = hub.repos["alice/fmnist-merged"]
    assert repo.private
    assert published["commit_url"].startswith(f"{hub.url}/alice/fmnist-merged/commit/")
    main = repo.commits[repo.refs["main"]]
    assert repo.commits[main.parent].parent is None  # the repo's initial commit, then ours
    assert {
        k: hashlib.sha256(v).hexdigest() for k, v in hub.files("alice/fmnist-merged").items() if k != ".gitattributes"
    } == published["before"]["merged"]
    assert not any(TOKEN.encode() in content for content in hub.files("alice/fmnist-merged").values())
    assert hub.unrouted == []  # the client called nothing this endpoint lacks


def test_transformers_loads_the_pushed_model_with_identical_weights(published):
    assert published["model_class"] == "PermMLPForImageClassification"
    assert published["weights_identical"] is True
    assert published["processor_class"] == "PermImageProcessor"


def test_pipeline_classifies_a_fashion_mnist_test_image_from_the_hub(published):
    import PIL.Image
    import torch

    from hf_permerge import PermMLPForImageClassification
    from hf_permerge.models.image_processing_perm import image_processor_for

    model = PermMLPForImageClassification.from_pretrained(published["tmp"] / "merged").eval()
    image = PIL.Image.open(published["tmp"] / "fmnist_test_0.png")
    pixel_values = image_processor_for(model.config)(image, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        probs = model(pixel_values).logits.softmax(-1)[0]
    top = probs.argsort(descending=True)[:3].tolist()
    predictions = published["predictions"]
    assert [p["label"] for p in predictions] == [model.config.id2label[i] for i in top]  # class names
    assert [round(p["score"], 5) for p in predictions] == [round(probs[i].item(), 5) for i in top]


def test_card_parses_back_with_base_models_and_numbers(published):
    meta = published["card"]
    assert meta["library_name"] == "hf_permerge" and meta["pipeline_tag"] == "image-classification"
    assert meta["base_model"] == ["alice/fmnist-mlp-seed0"]
    assert meta["merged_from"] == ["alice/fmnist-mlp-seed0", "runs/pair/net_1/final"]
    assert {"model-merging", "permutation-alignment", "mlp", "merge"} <= set(meta["tags"])
    assert meta["datasets"] == ["zalando-datasets/fashion_mnist"]
    assert {(m["type"], m["value"]) for m in published["eval_results"]} >= {
        ("accuracy", 0.8525),
        ("loss", 0.45),
        ("loss_barrier", 0.095),
        ("accuracy_barrier", 0.025),
        ("loss_barrier", 1.245),
    }


def test_pair_folder_round_trip(hub, published):
    expected = {k: v for k, v in published["before"]["pair"].items() if not k.startswith(".cache/")}
    assert set(hub.files("alice/fmnist-pair")) == set(expected) | {".gitattributes"}  # namespace from the token
    snapshot = Path(published["snapshot"])
    assert {k: v for k, v in tree_digest(snapshot).items() if k != ".gitattributes"} == expected
    assert published["resolved_repo"] == published["snapshot"]
    assert published["resolved_local"] == str(published["tmp"] / "pair")
    assert sorted(published["net_0_only"]) == sorted(k for k in expected if k.startswith("net_0/"))
    assert published["merger_nets"] == 2 and published["merger_sources"] == ["alice/fmnist-pair"] * 2
    assert published["merger_checkpoints"] == ["final", "init"]


def test_cli_reads_a_private_pair_with_token_and_revision(published):
    """merge/align/evaluate take --token and --revision for repo ids; the token is never saved."""
    runs = published["private_cli"]
    assert runs["no_token"]["rc"] == 2 and not runs["no_token"]["written"]
    assert "repository not found" in runs["no_token"]["stderr"] and "pass --token" in runs["no_token"]["stderr"]
    assert runs["bad_revision"]["rc"] == 2 and "revision does not exist" in runs["bad_revision"]["stderr"]
    assert not runs["bad_revision"]["written"]
    assert runs["with_token"]["rc"] == 0, runs["with_token"]["stderr"]
    assert published["private_hub_commits"] == {"alice/private-pair": published["private_commit"]}
    assert not published["private_token_saved"] and not published["private_card_command"]


def test_push_to_a_new_branch_and_as_a_pull_request(hub, published):
    repo = hub.repos["alice/fmnist-pair"]
    pair_files = set(hub.files("alice/fmnist-pair", "main"))
    merged_files = set(published["before"]["merged"])
    assert published["branch_commit"].endswith(repo.refs["with-merge"])
    assert set(hub.files("alice/fmnist-pair", "with-merge")) == pair_files | merged_files
    assert published["pr_url"] == f"{hub.url}/alice/fmnist-pair/discussions/1"
    assert set(hub.files("alice/fmnist-pair", "refs/pr/1")) == pair_files | merged_files
    assert not merged_files & pair_files  # main is untouched by both


@pytest.fixture
def online(monkeypatch):
    """Network calls allowed in this process, whatever HF_HUB_OFFLINE said when huggingface_hub was imported."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)


def assert_no_token_in(caplog, capfd):
    out, err = capfd.readouterr()
    for secret in (TOKEN, BAD_TOKEN):
        assert secret not in out + err + caplog.text


def test_bad_token_is_a_clear_error_and_leaves_the_folder_untouched(hub, online, tmp_path, caplog, capfd):
    from hf_permerge.hub import HubError, download_from_hub, push_folder_to_hub

    caplog.set_level(logging.DEBUG)
    folder = tmp_path / "merged"
    write_merged_folder(folder)
    before = tree_digest(folder)

    with pytest.raises(HubError) as push_err:
        push_folder_to_hub(folder, "alice/never-created", token=BAD_TOKEN, endpoint=hub.url)
    with pytest.raises(HubError) as download_err:
        download_from_hub("alice/fmnist-merged", token=BAD_TOKEN, endpoint=hub.url, cache_dir=tmp_path / "cache")

    for err in (push_err.value, download_err.value):
        assert err.reason == "unauthorized", err
        assert "401" in str(err) and "HF_TOKEN" in str(err) and "hf auth login" in str(err)
        print(err)  # shown, as a CLI would show it: must not carry the token
    assert tree_digest(folder) == before
    assert "alice/never-created" not in hub.repos
    assert_no_token_in(caplog, capfd)


def test_unreachable_endpoint_is_a_clear_error(online, tmp_path, caplog, capfd):
    from hf_permerge.hub import HubError, download_from_hub, push_folder_to_hub

    caplog.set_level(logging.DEBUG)
    folder = tmp_path / "merged"
    write_merged_folder(folder)
    before = tree_digest(folder)
    endpoint = closed_port_endpoint()

    with pytest.raises(HubError) as push_err:
        push_folder_to_hub(folder, "alice/x", token=TOKEN, endpoint=endpoint)
    with pytest.raises(HubError) as download_err:
        download_from_hub("alice/x", token=TOKEN, endpoint=endpoint, cache_dir=tmp_path / "cache")

    for err in (push_err.value, download_err.value):
        assert err.reason == "unreachable", err
        assert endpoint in str(err) and "HF_ENDPOINT" in str(err)
        print(err)
    assert tree_digest(folder) == before
    assert_no_token_in(caplog, capfd)


def test_offline_mode_is_a_clear_error(hub, tmp_path, monkeypatch):
    from huggingface_hub import constants

    from hf_permerge.hub import HubError, download_from_hub

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(HubError, match="offline mode is on.*HF_HUB_OFFLINE") as err:
        download_from_hub("alice/fmnist-merged", token=TOKEN, endpoint=hub.url, cache_dir=tmp_path / "cache")
    assert err.value.reason == "offline"


def test_missing_token_is_a_clear_error(tmp_path, monkeypatch):
    from huggingface_hub import constants

    from hf_permerge.hub import HubError, push_folder_to_hub

    for var in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_OIDC_RESOURCE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no_token_here"))
    folder = tmp_path / "merged"
    write_merged_folder(folder)
    with pytest.raises(HubError, match="no Hugging Face token found.*HF_TOKEN") as err:
        push_folder_to_hub(folder, "alice/x", endpoint=closed_port_endpoint())
    assert err.value.reason == "no_token"


def test_folder_is_validated_before_anything_is_sent(tmp_path):
    from hf_permerge.hub import HubError, files_to_push, folder_kind, push_folder_to_hub

    (tmp_path / "empty").mkdir()
    with pytest.raises(HubError, match="lacks config.json, model.safetensors") as err:
        push_folder_to_hub(tmp_path / "empty", "alice/x", token=TOKEN)
    assert err.value.reason == "invalid_folder"
    with pytest.raises(HubError, match="is not a directory"):
        push_folder_to_hub(tmp_path / "missing", "alice/x", token=TOKEN)
    (tmp_path / "pair").mkdir()
    (tmp_path / "pair" / "pair.json").write_text("{not json")
    with pytest.raises(HubError, match="pair.json is not valid JSON"):
        folder_kind(tmp_path / "pair")

    folder = tmp_path / "merged"
    write_merged_folder(folder)
    (folder / "__pycache__").mkdir()
    (folder / "__pycache__" / "x.pyc").write_bytes(b"")
    (folder / ".hidden").write_text("")
    assert folder_kind(folder) == "model"
    assert files_to_push(folder) == sorted(
        [
            "README.md",
            "config.json",
            "model.safetensors",
            "permutations.safetensors",
            "plots/interpolation.png",
            "preprocessor_config.json",
            "report.json",
        ]
    )


def test_model_card_metadata_and_body():
    from huggingface_hub import ModelCard

    from hf_permerge.merging.model_card import render_model_card

    card = ModelCard(str(render_model_card(card_info())))  # parses back from text
    assert card.data.base_model == ["alice/fmnist-mlp-seed0"]
    assert card.data.model_name == "fmnist-merged"
    results = {(r.metric_type, r.metric_name): r.metric_value for r in card.data.eval_results}
    assert results[("accuracy", "Test accuracy")] == 0.8525
    assert results[("loss_barrier", "Loss barrier (permuted, final)")] == 0.095
    assert results[("accuracy_barrier", "Accuracy barrier (vanilla, final)")] == 0.4675
    assert all(
        r.dataset_type == "zalando-datasets/fashion_mnist" and r.dataset_split == "test" for r in card.data.eval_results
    )
    text = card.text
    assert "| 0.5 | 0.4100 | 1.6000 | 0.8525 | 0.4500 |" in text  # λ, vanilla acc/loss, permuted acc/loss
    assert "![interpolation](plots/interpolation.png)" in text
    assert 'AutoModelForImageClassification.from_pretrained("alice/fmnist-merged", trust_remote_code=False)' in text
    assert "hf-permerge merge runs/pair --output-dir runs/merged" in text
    assert "arXiv:2209.07509" in text and "Benzing" in text
    assert "activation" in text and "similarity=cosine" in text


def test_model_card_tolerates_a_sparse_info():
    from huggingface_hub import ModelCard

    from hf_permerge.merging.model_card import render_model_card

    card = ModelCard(
        str(
            render_model_card(
                {
                    "base_models": [{"name": "net_0/final", "hub": False}, "bob/net-b"],
                    "report": {"curves": {"init": {"permuted": {"lambdas": [0, 1]}}}},
                }
            )
        )
    )
    assert card.data.base_model == ["bob/net-b"]
    assert card.data.eval_results is None
    assert "## Interpolation (init weights)" in card.text and "## Loss barrier" not in card.text
    with pytest.raises(ValueError, match="base_models"):
        render_model_card({})


def test_packaged_template_is_the_root_template():
    from hf_permerge.merging.model_card import TEMPLATE_PATH

    root = Path(__file__).resolve().parent.parent / "MODEL_CARD_TEMPLATE.md"
    assert TEMPLATE_PATH.read_text() == root.read_text(), (
        "copy MODEL_CARD_TEMPLATE.md to hf_permerge/templates/ (the packaged copy must stay identical)"
    )


# ---- client scenarios (run in a fresh interpreter by run_client) ---------------------------------------


def _scenario_round_trip(folder: str, repo_id: str, image: str) -> dict:
    import PIL.Image
    import torch
    from huggingface_hub import ModelCard
    from transformers import AutoImageProcessor, AutoModelForImageClassification, pipeline

    from hf_permerge.hub import push_folder_to_hub

    commit = push_folder_to_hub(folder, repo_id, private=True, commit_message="merged model")
    remote = AutoModelForImageClassification.from_pretrained(repo_id)
    local = AutoModelForImageClassification.from_pretrained(folder)
    identical = remote.state_dict().keys() == local.state_dict().keys() and all(
        torch.equal(v, local.state_dict()[k]) for k, v in remote.state_dict().items()
    )
    classifier = pipeline("image-classification", model=repo_id, device="cpu")
    card = ModelCard.load(repo_id)
    return {
        "commit_url": str(commit),
        "model_class": type(remote).__name__,
        "weights_identical": identical,
        "processor_class": type(AutoImageProcessor.from_pretrained(repo_id)).__name__,
        "predictions": classifier(PIL.Image.open(image), top_k=3),
        "card": card.data.to_dict(),
        "eval_results": [{"type": r.metric_type, "value": r.metric_value} for r in card.data.eval_results],
    }


def _scenario_pair_round_trip(folder: str, repo_id: str) -> dict:
    from hf_permerge.hub import download_from_hub, push_folder_to_hub, resolve_local_or_hub

    push_folder_to_hub(folder, repo_id)  # no namespace: the token's user
    full_id = f"alice/{repo_id}"
    partial = Path(download_from_hub(full_id, allow_patterns="net_0/*", cache_dir="partial_cache"))
    snapshot = download_from_hub(full_id)
    from hf_permerge.merging import PermMerger

    merger = PermMerger.from_pretrained(full_id)  # a pair straight from its Hub repo id
    return {
        "snapshot": snapshot,
        "resolved_repo": resolve_local_or_hub(full_id),
        "merger_nets": merger.num_nets,
        "merger_sources": [s.hub_id for s in merger.sources],
        "merger_checkpoints": sorted(merger.sources[1].checkpoints),
        "resolved_local": resolve_local_or_hub(folder),
        "net_0_only": [p.relative_to(partial).as_posix() for p in partial.rglob("*") if p.is_file()],
    }


def _scenario_branch_and_pr(folder: str, repo_id: str) -> dict:
    from hf_permerge.hub import push_folder_to_hub

    branch = push_folder_to_hub(folder, repo_id, revision="with-merge", commit_message="to a new branch")
    pr = push_folder_to_hub(folder, repo_id, create_pr=True, commit_message="as a pull request")
    return {"branch_commit": str(branch), "pr_url": pr.pr_url}


def _scenario_private_pair_cli(folder: str, repo_id: str) -> dict:
    """`hf-permerge merge` of a private pair repo: refused without a token, merged with --token and --revision."""
    import contextlib
    import io

    from hf_permerge import cli
    from hf_permerge.hub import push_folder_to_hub

    commit = push_folder_to_hub(folder, repo_id, private=True).oid
    del os.environ["HF_TOKEN"]  # from here on, only --token can read the repo
    outcome = {}
    for name, extra in [
        ("no_token", []),
        ("bad_revision", ["--token", TOKEN, "--revision", "no-such-branch"]),
        ("with_token", ["--token", TOKEN, "--revision", commit]),
    ]:
        stderr = io.StringIO()
        with contextlib.redirect_stderr(stderr):
            rc = cli.main(["merge", repo_id, "--vanilla", "-q", "-o", f"merged_{name}", *extra])
        outcome[name] = {"rc": rc, "stderr": stderr.getvalue(), "written": Path(f"merged_{name}").exists()}
    config = json.loads(Path("merged_with_token/merge_config.json").read_text())
    saved = "".join(p.read_text(errors="ignore") for p in Path("merged_with_token").rglob("*") if p.is_file())
    return {
        "private_cli": outcome,
        "private_commit": commit,
        "private_hub_commits": config.get("hub_commits"),
        "private_token_saved": TOKEN in saved,
        "private_card_command": "--token" in saved,
    }


def _scenario_publish(merged: str, merged_repo: str, image: str, pair: str, pair_repo: str) -> dict:
    return {
        **_scenario_round_trip(merged, merged_repo, image),
        **_scenario_pair_round_trip(pair, pair_repo),
        **_scenario_branch_and_pr(merged, f"alice/{pair_repo}"),
        **_scenario_private_pair_cli(pair, "alice/private-pair"),
    }  # last: it unsets HF_TOKEN


if __name__ == "__main__":
    logging.basicConfig(level=logging.DEBUG)  # the token must not show even in debug logs
    import hf_permerge  # noqa: F401  (registers our classes with the Auto classes)

    scenario, scenario_args = sys.argv[1], json.loads(sys.argv[2])
    outcome = globals()[f"_scenario_{scenario}"](**scenario_args)
    print(RESULT + json.dumps(outcome, default=str), flush=True)


def test_a_card_saved_before_its_repo_was_known_loads_from_the_repo_once_pushed(tmp_path):
    from hf_permerge.hub import _card_for_repo
    from hf_permerge.merging.model_card import LOCAL_REPO_PLACEHOLDER, render_model_card

    info = {k: v for k, v in card_info().items() if k != "repo_id"}
    render_model_card(info).save(tmp_path / "README.md")
    local = (tmp_path / "README.md").read_text()
    assert LOCAL_REPO_PLACEHOLDER in local
    pushed = _card_for_repo(tmp_path / "README.md", "alice/fmnist-merged").decode()
    assert (
        LOCAL_REPO_PLACEHOLDER not in pushed
        and 'from_pretrained("alice/fmnist-merged", trust_remote_code=False)' in pushed
    )
    assert (tmp_path / "README.md").read_text() == local


def test_recorded_command_leaves_the_token_out():
    from types import SimpleNamespace

    from hf_permerge.cli import command_line

    args = SimpleNamespace(argv=["merge", "alice/pair", "--token", TOKEN, "--token=" + TOKEN, "-o", "my out"])
    assert command_line(args) == "hf-permerge merge alice/pair -o 'my out'"
    from hf_permerge.cli import build_parser

    with pytest.raises(SystemExit):  # an abbreviation would escape the redaction: refused
        build_parser().parse_args(["merge", "alice/pair", "--tok", TOKEN, "-o", "out"])


def test_a_revision_for_local_folders_only_is_refused(tmp_path):
    from hf_permerge.merging import PermMerger

    write_pair_folder(tmp_path / "pair")
    with pytest.raises(ValueError, match="revision='v1' applies to Hub repo ids.*local folder"):
        PermMerger.from_pretrained(tmp_path / "pair", revision="v1")
    with pytest.raises(ValueError, match="applies to Hub repo ids.*local folders"):
        PermMerger.from_pretrained([tmp_path / "pair" / "net_0", tmp_path / "pair" / "net_1"], revision="v1")
