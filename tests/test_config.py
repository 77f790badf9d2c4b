"""Config validation: a typo or a wrong type is an error naming the key, before anything runs."""
import pytest

from hf_permerge.config import ConfigError, config_from_dict, load_config


def test_shipped_configs_load():
    from pathlib import Path

    paths = sorted(Path(__file__).parents[1].joinpath("configs").glob("*.yaml"))  # run configs (sweeps: test_sweeps)
    assert paths
    for path in paths:
        load_config(path)


def test_defaults_are_the_papers():
    c = config_from_dict({})
    t = c.training
    assert (t.optimizer, t.lr, t.weight_decay, t.batch_size, t.epochs) == ("adamw", 1e-3, 1e-2, 100, 5)
    assert c.alignment.similarity == "cosine" and c.alignment.num_examples == 10000
    assert c.evaluation.num_lambdas == 11


@pytest.mark.parametrize("data,key", [
    ({"training": {"epochz": 1}}, "training.epochz: unknown key"),
    ({"training": {"epochs": "five"}}, "training.epochs"),
    ({"training": {"lr": -1.0}}, "training.lr"),
    ({"model": {"type": "transformer"}}, "model.type"),
    ({"model": {"type": "cnn", "layers": "64-avg-x"}}, "'x'"),
    ({"bogus": {}}, "bogus: unknown key"),
    ({"training": {"save_steps": [0]}}, "save_steps"),
])
def test_bad_values_name_the_key(data, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.").replace("(", r"\(")):
        config_from_dict(data)


def test_overrides_parse_yaml_values(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("model: {type: mlp, width: 64}\n")
    c = load_config(p, ["training.epochs=1", "training.lr=3e-4", "training.save_steps=[1,2]", "model.depth=3"])
    assert (c.training.epochs, c.training.lr, c.training.save_steps, c.model.depth, c.model.width) == (1, 3e-4, [1, 2], 3, 64)
    with pytest.raises(ConfigError, match="section.key=value"):
        load_config(p, ["training.epochs"])


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    (tmp_path / "bad.yaml").write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(tmp_path / "bad.yaml")
