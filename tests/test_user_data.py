"""Aligning on a user's own `datasets.Dataset`, and models whose inputs are not Fashion-MNIST's.

Our models normalise a Dataset themselves; any other model (a transformers ViT) goes through the image
processor saved beside it. Data that cannot fit gets an error naming the fix, before anything is written.
"""

from __future__ import annotations

import json

import numpy as np
import PIL.Image
import pytest
import torch

from hf_permerge.merging import PermMerger
from hf_permerge.merging.inputs import as_tensor_split


def images(n: int, size: int, mode: str, seed: int = 0) -> list[PIL.Image.Image]:
    rng = np.random.default_rng(seed)
    grey = rng.integers(0, 256, (n, size, size), dtype=np.uint8)
    return [PIL.Image.fromarray(g).convert(mode) for g in grey]


@pytest.fixture(scope="module")
def rgb_vits(tmp_path_factory):
    """Two randomly initialised RGB 32x32 ViTs, each saved with its image processor (no pair.json)."""
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

    folder = tmp_path_factory.mktemp("vits")
    paths = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        model = ViTForImageClassification(
            ViTConfig(
                image_size=32,
                patch_size=8,
                num_channels=3,
                hidden_size=16,
                num_hidden_layers=1,
                num_attention_heads=2,
                intermediate_size=32,
                num_labels=10,
            )
        )
        model.save_pretrained(folder / f"vit_{seed}")
        ViTImageProcessor(size={"height": 32, "width": 32}, image_mean=[0.5] * 3, image_std=[0.5] * 3).save_pretrained(
            folder / f"vit_{seed}"
        )
        paths.append(folder / f"vit_{seed}")
    return paths


def test_a_vit_aligns_on_a_dataset_through_its_image_processor(rgb_vits, tmp_path):
    from datasets import Dataset

    ds = Dataset.from_dict({"image": images(48, 40, "RGB"), "label": list(range(10)) * 4 + list(range(8))})
    merger = PermMerger.from_pretrained(rgb_vits)
    merger.align(ds, num_examples=32)
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(
            merger.permuted(1)(pixel_values=x).logits, merger.load(1)(pixel_values=x).logits, atol=1e-5, rtol=1e-5
        )
    merger.merge(0.5)
    merger.save_pretrained(tmp_path / "merged")
    config = json.loads((tmp_path / "merged" / "merge_config.json").read_text())
    assert config["dataset"] is None and config["alignment"]["data"] == "given by the caller"
    assert "Fashion-MNIST" not in (tmp_path / "merged" / "README.md").read_text()


def test_vits_saved_without_a_processor_take_one_from_the_caller(rgb_vits, tmp_path, caplog):
    """The merged folder of models saved without a processor loads in `pipeline()` when the caller passes one."""
    import shutil

    from datasets import Dataset
    from transformers import ViTImageProcessor, pipeline

    bare = []
    for path in rgb_vits:
        shutil.copytree(path, tmp_path / path.name, ignore=shutil.ignore_patterns("preprocessor_config.json"))
        bare.append(tmp_path / path.name)
    ds = Dataset.from_dict({"image": images(24, 40, "RGB"), "label": list(range(10)) * 2 + list(range(4))})
    with pytest.raises(ValueError, match=r"image_processor=\.\.\."):
        PermMerger.from_pretrained(bare).align(ds, num_examples=16)
    without = PermMerger.from_pretrained(bare)
    without.align(matcher="weight")
    with caplog.at_level("WARNING"):
        without.save_pretrained(tmp_path / "without")
    assert "image_processor=AutoImageProcessor" in caplog.text
    assert not (tmp_path / "without" / "preprocessor_config.json").exists()

    processor = ViTImageProcessor(size={"height": 32, "width": 32}, image_mean=[0.5] * 3, image_std=[0.5] * 3)
    merger = PermMerger.from_pretrained(bare, image_processor=processor)
    merger.align(ds, num_examples=16)
    merger.merge(0.5)
    merger.save_pretrained(tmp_path / "with")
    predictions = pipeline("image-classification", model=str(tmp_path / "with"))(images(2, 40, "RGB"))
    assert len(predictions) == 2 and all(len(p) == 5 for p in predictions)


def test_cli_merges_rgb_vits_by_weights_and_says_why_activations_need_their_data(rgb_vits, tmp_path, capsys, run_cli):
    assert run_cli("merge", *rgb_vits, "--matcher", "weight", "-q", "-o", tmp_path / "by_weights") == 0
    assert (tmp_path / "by_weights" / "model.safetensors").is_file()
    assert run_cli("merge", *rgb_vits, "-q", "-o", tmp_path / "by_activations") == 2
    err = capsys.readouterr().err
    assert "do not fit these models, which take (3, 32, 32)" in err and "--matcher weight, which needs no data" in err
    assert "--dataset / --data-dir" in err
    assert not (tmp_path / "by_activations").exists()
    assert run_cli("merge", *rgb_vits, "--matcher", "weight", "--repair", "repair", "-q", "-o", tmp_path / "rep") == 2
    err = capsys.readouterr().err
    assert "repair_data=dataset" in err and "drop --repair" in err and "--matcher weight" not in err


def test_our_models_take_rgb_images_without_labels_through_their_processor(tiny_pair):
    """RGB images whose three channels are equal are the grey images they came from: the same permutations."""
    from datasets import Dataset

    grey = images(200, 28, "L", seed=3)
    merger = PermMerger.from_pretrained(tiny_pair)
    by_grey = merger.align(Dataset.from_dict({"image": grey, "label": [0] * 200}), num_examples=200)
    by_rgb = merger.align(
        Dataset.from_dict(
            {
                "image": [
                    g.convert("RGB").resize((32, 32), PIL.Image.NEAREST).resize((28, 28), PIL.Image.NEAREST)
                    for g in grey
                ]
            }
        ),
        num_examples=200,
    )
    for a, b in zip(by_grey, by_rgb):
        assert all(torch.equal(a[g], b[g]) for g in merger.spec.names)


def test_dataset_shapes_a_user_may_pass_get_the_fix_named(tiny_pair):
    from datasets import Dataset, DatasetDict

    model = PermMerger.from_pretrained(tiny_pair).load(0)
    grey = images(8, 28, "L")
    with pytest.raises(ValueError, match=r"lacks an 'image' column.*rename_column\('img', 'image'\)"):
        as_tensor_split(Dataset.from_dict({"img": grey, "labels": [0] * 8}), model)
    with pytest.raises(ValueError, match=r"DatasetDict.*ds\['train'\]"):
        as_tensor_split(DatasetDict(train=Dataset.from_dict({"image": grey})), model)
    with pytest.raises(ValueError, match="differ in size"):
        as_tensor_split(Dataset.from_dict({"image": grey[:4] + images(4, 32, "L")}), model)
    with pytest.raises(ValueError, match=r"\(1, 32, 32\) do not fit the model.*\(1, 28, 28\)"):
        as_tensor_split(Dataset.from_dict({"image": images(4, 32, "L")}), model)


def test_the_gradient_matcher_refuses_a_dataset_without_labels(tiny_pair):
    from datasets import Dataset

    merger = PermMerger.from_pretrained(tiny_pair)
    with pytest.raises(ValueError, match="gradient matcher needs labels"):
        merger.align(Dataset.from_dict({"image": images(16, 28, "L")}), matcher="gradient", checkpoint="init")


def test_a_mistyped_local_path_is_named_as_such(tmp_path, monkeypatch):
    from hf_permerge.hub import HubError
    from hf_permerge.merging import sources  # where the merger asks the Hub

    (tmp_path / "models" / "vit_1").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)

    def no_hub(*args, **kwargs):
        raise HubError("cannot download models/vit_9: the Hub endpoint is unreachable", "unreachable")

    monkeypatch.setattr(sources, "resolve_local_or_hub", no_hub)
    with pytest.raises(FileNotFoundError, match=r"no folder models/vit_9 \(models holds: vit_1\); nor is it a Hub"):
        PermMerger.from_pretrained(["models/vit_1", "models/vit_9"])
    monkeypatch.setattr(sources, "resolve_local_or_hub", lambda *a, **k: pytest.fail("a path that is no repo id"))
    with pytest.raises(FileNotFoundError, match=r"no folder .*models/x/vit_9 \(.*models holds: vit_1\)$"):
        PermMerger.from_pretrained([tmp_path / "models" / "vit_1", tmp_path / "models" / "x" / "vit_9"])


def test_a_damaged_weights_file_is_named(tmp_path):
    from hf_permerge import PermMLPConfig, PermMLPForImageClassification
    from hf_permerge.models.folders import load_model, save_model

    save_model(PermMLPForImageClassification(PermMLPConfig(depth=1, width=8)), tmp_path / "m")
    weights = tmp_path / "m" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(ValueError, match=r"cannot read .*/m/model.safetensors: it is truncated .*save or download"):
        load_model(tmp_path / "m")


def test_nets_differing_only_in_dropout_merge_and_other_model_types_are_named(tmp_path):
    from transformers import ResNetConfig, ViTConfig

    from hf_permerge.merging.merger import check_same_architecture

    small = dict(
        image_size=32,
        patch_size=8,
        num_channels=3,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
    )
    check_same_architecture([ViTConfig(**small), ViTConfig(**small, hidden_dropout_prob=0.1)], ["a", "b"])
    with pytest.raises(ValueError, match=r"different model types \('vit' vs 'resnet'\)"):
        check_same_architecture([ViTConfig(**small), ResNetConfig()], ["a", "b"])
    with pytest.raises(ValueError, match="different architectures.*hidden_size: 16 vs 32"):
        check_same_architecture([ViTConfig(**small), ViTConfig(**{**small, "hidden_size": 32})], ["a", "b"])


def test_a_pair_folder_in_a_list_of_models_is_named(tiny_pair, caplog):
    with pytest.raises(ValueError, match="is a pair folder, which holds its own nets: pass it alone"):
        PermMerger.from_pretrained([tiny_pair, tiny_pair / "net_1"])
    assert "same model" not in caplog.text
    PermMerger.from_pretrained([tiny_pair / "net_0" / "final", tiny_pair / "net_0" / "final"])
    assert "are the same model" in caplog.text


def test_cli_evaluates_two_model_folders_with_a_config(tiny_pair, tiny_fmnist, tmp_path, capsys, run_cli):
    """Models saved alone (no init beside them, no pair.json): the report covers the trained nets, and the
    alignment reads the config's data, the data the curves are measured on."""
    import shutil

    from hf_permerge.alignment import Permutations
    from hf_permerge.data import load_tensors

    config = tmp_path / "eval.yaml"
    config.write_text(
        f"model: {{type: cnn}}\ndata: {{data_dir: {tiny_fmnist}}}\n"  # a model section of other nets
        "alignment: {num_examples: 500}\n"
        "evaluation: {num_lambdas: 3, splits: [test], n_way: false}\n"
    )
    models = [tmp_path / "plain_0", tmp_path / "plain_2"]
    for net, folder in zip((0, 2), models):
        shutil.copytree(tiny_pair / f"net_{net}" / "final", folder)
    assert run_cli("evaluate", *models, "-q", "-o", tmp_path / "no_config") == 2
    assert "no pair.json; pass a config (--config)" in capsys.readouterr().err
    assert run_cli("evaluate", *models, "--config", config, "-q", "-o", tmp_path / "out") == 0
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["pair"] == ["plain_0", "plain_2"] and set(report["curves"]) == {"final"}
    assert (
        report["config"]["model"]["width"] == 32 and report["config"]["training"] is None
    )  # the models', not --config's
    assert (
        report["barrier"]["final"]["permuted"]["test"]["loss"] <= report["barrier"]["final"]["vanilla"]["test"]["loss"]
    )
    used = Permutations.load(tmp_path / "out" / "permutations" / "net_1.safetensors").info["data"]["fingerprint"]
    assert used == load_tensors("fashion_mnist", "train", data_dir=tiny_fmnist).subset(500, 0).fingerprint
    assert (tmp_path / "out" / "interpolation.png").is_file()
    assert json.loads((tmp_path / "out" / "merged" / "merge_config.json").read_text())["dataset"] == "fashion_mnist"


def test_a_dataset_is_converted_only_as_far_as_the_matcher_reads_it(tiny_pair):
    """Aligning on a Dataset converts the matcher's seeded subset alone, and finds what the whole split would."""
    from datasets import Dataset

    from hf_permerge.merging.inputs import as_tensor_split

    ds = Dataset.from_dict({"image": images(300, 28, "L", seed=5), "label": [1] * 300})
    merger = PermMerger.from_pretrained(tiny_pair)
    by_dataset = merger.align(ds, num_examples=100)
    by_split = merger.align(as_tensor_split(ds, merger.load(0)), num_examples=100)
    for a, b in zip(by_dataset, by_split):
        assert all(torch.equal(a[g], b[g]) for g in merger.spec.names)
    assert by_dataset[1].info["data"]["num_examples"] == 100


def test_weight_matching_reads_no_data_and_names_none(rgb_vits, tmp_path, monkeypatch):
    """Tracing a ViT (its config gives the input shape) and matching its weights load no data set at all."""
    from datasets import Dataset

    from hf_permerge.merging import merge_data, nets

    for module in (merge_data, nets):  # where the merger loads a data set: tracing, default data
        monkeypatch.setattr(module, "load_tensors", lambda *a, **k: pytest.fail("a data set was loaded"))
    merger = PermMerger.from_pretrained(rgb_vits)
    merger.align(Dataset.from_dict({"img": images(4, 28, "L")}), matcher="weight")  # not even looked at
    merger.merge(0.5)
    merger.save_pretrained(tmp_path / "merged")
    assert json.loads((tmp_path / "merged" / "merge_config.json").read_text())["dataset"] is None


def test_cli_aligns_model_folders_on_the_data_set_named(tiny_pair, tiny_fmnist, tmp_path, capsys, run_cli):
    from hf_permerge.alignment import Permutations
    from hf_permerge.data import load_tensors

    models = [tiny_pair / "net_0" / "final", tiny_pair / "net_1" / "final"]
    assert run_cli("merge", *models, "--dataset", "imagenet", "-q", "-o", tmp_path / "bad") == 2
    assert (
        "'imagenet' is not a data set of the catalog (fashion_mnist, mnist, cifar10), a folder, nor a Hub dataset id"
        in capsys.readouterr().err
        and not (tmp_path / "bad").exists()
    )
    assert run_cli("merge", *models, "--vanilla", "--data-dir", tiny_fmnist, "-q", "-o", tmp_path / "vanilla") == 2
    assert "--data-dir cannot be used with --vanilla" in capsys.readouterr().err
    assert (
        run_cli(
            "align",
            *models,
            "--dataset",
            "fashion_mnist",
            "--data-dir",
            tiny_fmnist,
            "--num-examples",
            300,
            "-q",
            "-o",
            tmp_path / "perms",
        )
        == 0
    )
    used = Permutations.load(tmp_path / "perms" / "net_1.safetensors").info["data"]["fingerprint"]
    assert used == load_tensors("fashion_mnist", "train", data_dir=tiny_fmnist).subset(300, 0).fingerprint


def test_cli_aligns_and_repairs_on_a_saved_dataset_or_a_folder_of_images(
    tiny_pair, tiny_fmnist, tmp_path, capsys, run_cli
):
    """--dataset takes what users keep their data in: a save_to_disk folder (DatasetDict, CIFAR-style column
    names) or a folder of images; the alignment equals aligning on the same Dataset in Python."""
    from datasets import ClassLabel, Dataset, DatasetDict, Features
    from datasets import Image as ImageFeature

    from hf_permerge.alignment import Permutations
    from hf_permerge.data.idx import read_idx

    pixels = read_idx(tiny_fmnist / "train-images-idx3-ubyte.gz")[:200]
    labels = read_idx(tiny_fmnist / "train-labels-idx1-ubyte.gz")[:200].astype(int)
    features = Features({"img": ImageFeature(), "fine_label": ClassLabel(num_classes=10)})
    ds = Dataset.from_dict({"img": [PIL.Image.fromarray(p) for p in pixels], "fine_label": labels}, features=features)
    DatasetDict({"train": ds, "test": ds.select(range(20))}).save_to_disk(tmp_path / "saved")
    models = [tiny_pair / "net_0" / "final", tiny_pair / "net_1" / "final"]

    assert (
        run_cli(
            "align", *models, "--dataset", tmp_path / "saved", "--num-examples", 150, "-q", "-o", tmp_path / "perms"
        )
        == 0
    )
    merger = PermMerger.from_pretrained(models)
    expected = merger.align(ds.rename_columns({"img": "image", "fine_label": "label"}), num_examples=150)[1]
    found = Permutations.load(tmp_path / "perms" / "net_1.safetensors")
    assert all(torch.equal(found[g], expected[g]) for g in merger.spec.names)
    assert found.info["data"]["fingerprint"] == expected.info["data"]["fingerprint"]

    assert (
        run_cli(
            "merge",
            *models,
            "--dataset",
            tmp_path / "saved",
            "--dataset-split",
            "test",
            "--repair",
            "repair",
            "--num-examples",
            20,
            "-q",
            "-o",
            tmp_path / "merged",
        )
        == 0
    )
    config = json.loads((tmp_path / "merged" / "merge_config.json").read_text())
    assert config["dataset"] is None and str(tmp_path) not in (tmp_path / "merged" / "README.md").read_text()

    for i, label in enumerate(labels[:30]):
        (tmp_path / "images" / f"class_{label}").mkdir(parents=True, exist_ok=True)
        PIL.Image.fromarray(pixels[i]).save(tmp_path / "images" / f"class_{label}" / f"{i}.png")
    assert (
        run_cli(
            "merge",
            *models,
            "--dataset",
            tmp_path / "images",
            "--num-examples",
            30,
            "-q",
            "-o",
            tmp_path / "from_images",
        )
        == 0
    )

    for args, message in (
        (
            ("--dataset", tmp_path / "saved", "--dataset-split", "validation"),
            "has the splits ['test', 'train'], not 'validation'; choose one with --dataset-split",
        ),
        (("--dataset", tmp_path / "saved", "--data-dir", tiny_fmnist), "drop --data-dir"),
        (("--dataset", "fashion_mnist", "--dataset-split", "test"), "drop --dataset-split"),
        (("--dataset", tmp_path / "perms" / "alignment.json"), "is a file"),
    ):
        assert run_cli("merge", *models, *args, "-q", "-o", tmp_path / "refused") == 2
        assert message in capsys.readouterr().err and not (tmp_path / "refused").exists()


def test_labels_follow_the_models_classes_by_name_and_out_of_range_labels_are_refused(tiny_pair, tiny_fmnist, caplog):
    """A folder of images numbers its classes alphabetically; the models number them as they were trained."""
    from datasets import ClassLabel, Dataset, Features
    from datasets import Image as ImageFeature

    from hf_permerge.data.idx import read_idx

    merger = PermMerger.from_pretrained(tiny_pair)
    model = merger.load(0)
    ours = [model.config.id2label[i] for i in range(10)]
    pixels = read_idx(tiny_fmnist / "train-images-idx3-ubyte.gz")[:40]
    labels = read_idx(tiny_fmnist / "train-labels-idx1-ubyte.gz")[:40].astype(int)
    folder_names = sorted(n.replace(" / ", "_").replace(" - ", "-") for n in ours)  # how folders spell them
    to_folder = {i: folder_names.index(ours[i].replace(" / ", "_").replace(" - ", "-")) for i in range(10)}
    ds = Dataset.from_dict(
        {"image": [PIL.Image.fromarray(p) for p in pixels], "label": [to_folder[y] for y in labels]},
        features=Features({"image": ImageFeature(), "label": ClassLabel(names=folder_names)}),
    )
    assert torch.equal(as_tensor_split(ds, model).labels, torch.as_tensor(labels))

    three = [i for i, y in enumerate(labels) if y in (1, 4, 8)]  # Trouser, Coat, Bag: a folder with 3 classes
    subset_names = sorted(folder_names[to_folder[y]] for y in (1, 4, 8))
    subset = Dataset.from_dict(
        {
            "image": [PIL.Image.fromarray(pixels[i]) for i in three],
            "label": [subset_names.index(folder_names[to_folder[labels[i]]]) for i in three],
        },
        features=Features({"image": ImageFeature(), "label": ClassLabel(names=subset_names)}),
    )
    assert torch.equal(as_tensor_split(subset, model).labels, torch.as_tensor(labels[three]))

    other = ds.cast_column("label", ClassLabel(names=[f"class {i}" for i in range(10)]))
    with caplog.at_level("WARNING"):
        assert torch.equal(as_tensor_split(other, model).labels, torch.as_tensor([to_folder[y] for y in labels]))
    assert "are not among the models'" in caplog.text
    too_many = Dataset.from_dict({"image": [PIL.Image.fromarray(p) for p in pixels], "label": [11] * 40})
    with pytest.raises(ValueError, match="labels go up to 11, but the models have 10 classes"):
        merger.align(too_many, matcher="gradient", num_examples=40)


def test_what_the_card_and_merge_config_say_about_the_data(
    tiny_pair, tiny_fmnist, tmp_path, capsys, run_cli, monkeypatch
):
    """The card names the data the nets were trained on; alignment and REPAIR data are recorded as what they
    were; a local path is never written; options that would be ignored are refused."""
    from datasets import Dataset

    from hf_permerge.data.idx import read_idx

    pixels = read_idx(tiny_fmnist / "train-images-idx3-ubyte.gz")[:100]
    single = Dataset.from_dict({"image": [PIL.Image.fromarray(p) for p in pixels]})
    single.save_to_disk(tmp_path / "saved")

    assert (
        run_cli(
            "merge", tiny_pair, "--dataset", tmp_path / "saved", "--repair", "repair", "-q", "-o", tmp_path / "merged"
        )
        == 0
    )
    config = json.loads((tmp_path / "merged" / "merge_config.json").read_text())
    assert config["dataset"] == "fashion_mnist"  # what the pair was trained on
    assert config["alignment"]["data"] == "a data set without a Hub id (a local folder, or an unnamed datasets.Dataset)"
    assert config["alignment"]["examples"] == 100 and config["alignment"]["settings"]["num_examples"] == 10000
    assert (
        config["merge"]["repair_data"] == "a data set without a Hub id (a local folder, or an unnamed datasets.Dataset)"
    )
    assert str(tmp_path) not in (tmp_path / "merged" / "README.md").read_text() + json.dumps(config)

    merger = PermMerger.from_pretrained(tiny_pair)
    merger.use_data(
        Dataset.from_dict({"image": [PIL.Image.fromarray(p) for p in pixels[:30]]}, split="test"),
        name="someone/fmnist-copy",
    )  # as load_dataset("someone/fmnist-copy", split="test") gives it
    merger.align(num_examples=20)
    assert merger.alignment["data"] == "someone/fmnist-copy test split" and merger.alignment["examples"] == 20
    with pytest.raises(ValueError, match="not a Hub dataset id"):
        merger.use_data(single, name=str(tmp_path / "saved"))
    with pytest.raises(ValueError, match="unknown dataset 'fashion-mnist'"):
        merger.use_data("fashion-mnist")
    with pytest.raises(TypeError, match="a catalog name .* or a datasets.Dataset, got list"):
        merger.use_data([1, 2])

    monkeypatch.chdir(tmp_path)
    refusals = (
        (("--dataset", "saved", "--dataset-split", "test"), "holds one split only"),
        (("--dataset", "saved/nope"), "there is no folder saved/nope"),
        (("--dataset", "fashion_mnist", "--matcher", "weight"), "--matcher weight reads no data"),
        (("--dataset", "fasion_mnist"), "is not a data set of the catalog"),
    )
    for args, message in refusals:
        assert run_cli("merge", tiny_pair, *args, "-q", "-o", tmp_path / "refused") == 2
        assert message in capsys.readouterr().err and not (tmp_path / "refused").exists()
    assert run_cli("align", tiny_pair, "--num-examples", 100, "-q", "-o", tmp_path / "merged") == 2
    assert "does not hold a set of permutations of hf_permerge (no alignment.json)" in capsys.readouterr().err
