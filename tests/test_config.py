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


@pytest.mark.parametrize(
    "data,key",
    [
        ({"training": {"epochz": 1}}, "training.epochz: unknown key"),
        ({"training": {"epochs": "five"}}, "training.epochs"),
        ({"training": {"lr": -1.0}}, "training.lr"),
        ({"model": {"type": "transformer"}}, "model.type"),
        ({"model": {"type": "cnn", "layers": "64-avg-x"}}, "'x'"),
        ({"bogus": {}}, "bogus: unknown key"),
        ({"training": {"save_steps": [0]}}, "save_steps"),
    ],
)
def test_bad_values_name_the_key(data, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.").replace("(", r"\(")):
        config_from_dict(data)


def test_overrides_parse_yaml_values(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("model: {type: mlp, width: 64}\n")
    c = load_config(p, ["training.epochs=1", "training.lr=3e-4", "training.save_steps=[1,2]", "model.depth=3"])
    assert (c.training.epochs, c.training.lr, c.training.save_steps, c.model.depth, c.model.width) == (
        1,
        3e-4,
        [1, 2],
        3,
        64,
    )
    with pytest.raises(ConfigError, match="section.key=value"):
        load_config(p, ["training.epochs"])


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    (tmp_path / "bad.yaml").write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(tmp_path / "bad.yaml")


def test_typos_get_the_nearest_key_and_overrides_are_named(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("model: {type: mlp}\n")
    with pytest.raises(
        ConfigError, match=r"model\.widht: unknown key \[from --set model\.widht=3\] \(did you mean 'width'"
    ):
        load_config(p, ["model.widht=3"])
    with pytest.raises(ConfigError, match=r"trainin: unknown key .*did you mean 'training'"):
        load_config(p, ["trainin.epochs=3"])
    with pytest.raises(ConfigError, match=r"training\.epochs: .* \[from --set training\.epochs=-1\]"):
        load_config(p, ["training.epochs=-1"])


def test_overrides_that_cannot_apply_name_the_culprit(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("model: {type: mlp}\n")
    with pytest.raises(ConfigError, match=r"'training' is not a section \(it holds 1"):
        load_config(p, ["training=1", "training.max_steps=1"])
    with pytest.raises(ConfigError, match="must look like section.key=value"):
        load_config(p, ["=1"])


@pytest.mark.parametrize("text,problem", [("- a\n- b\n", "must be a mapping .* holds a list"), ("", "is empty")])
def test_a_config_file_that_is_not_a_mapping_is_refused_even_with_overrides(tmp_path, text, problem):
    p = tmp_path / "c.yaml"
    p.write_text(text)
    with pytest.raises(ConfigError, match=problem):
        load_config(p, ["training.max_steps=1"])


def test_schedules_at_steps_that_are_not_saved_are_refused_before_training(tmp_path):
    """perm@x needs the nets at step x: 0, a saved step or max_steps; a run used to train first and then skip it."""
    path = tmp_path / "c.yaml"
    path.write_text("training: {save_steps: [50], max_steps: 200}\nevaluation: {schedules: [0, 50, 200]}\n")
    assert load_config(path).evaluation.schedules == [0, 50, 200]
    with pytest.raises(ConfigError) as err:
        load_config(path, ["evaluation.schedules=[0,50,100]"])
    assert str(err.value).splitlines()[1] == (
        "  evaluation.schedules asks for perm@100, but the nets are not saved at that step (training.save_steps: "
        "[50]); add it to training.save_steps, or drop it from evaluation.schedules "
        "[from --set evaluation.schedules=[0,50,100]]"
    )


def test_a_key_without_its_section_and_a_sweep_file_are_pointed_to_the_right_place(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model: {type: mlp}\n")
    with pytest.raises(
        ConfigError,
        match=r"max_steps: unknown key \[from --set max_steps=5\] \(did you mean "
        r"'training.max_steps'\?",
    ):
        load_config(path, ["max_steps=5"])
    path.write_text("sweep: {name: x}\n")
    with pytest.raises(ConfigError, match=r"sweep: unknown key \(a sweep config runs with `hf-permerge sweep FILE"):
        load_config(path)


def test_an_architecture_key_of_the_other_architecture_is_named_as_ignored(tmp_path, caplog):
    path = tmp_path / "c.yaml"
    path.write_text("model: {type: cnn, layers: 8-avg-16}\n")
    with caplog.at_level("WARNING"):
        load_config(path)
        assert not caplog.text
        load_config(path, ["model.width=1024"])
    assert "model.width has no effect on a CNN (its layers are model.layers" in caplog.text
    caplog.clear()
    path.write_text("model: {type: mlp, layers: 8-avg-16}\n")
    with caplog.at_level("WARNING"):
        load_config(path)
    assert "model.layers has no effect on an MLP" in caplog.text
