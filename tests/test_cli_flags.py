"""The command line: its flags follow the config's rules, and it answers --help without the heavy imports."""

from __future__ import annotations

import argparse
import subprocess
import sys

import pytest

from hf_permerge import cli
from hf_permerge.config import ConfigError, config_from_dict, parse_yaml

VALUES = [
    "0",
    "-1",
    "2",
    "1.5",
    ".inf",
    "-.inf",
    ".nan",
    "abc",
    "[1]",
    "null",
    "true",
    "cosine",
    "float64",
    "average",
    "foof",
    "weight",
    "reset_bn",
    "final",
]
"""Candidate flag values: for each flag that mirrors a config field, some of these are refused by the field."""


def _mirrored_flags() -> list[tuple[str, str, str]]:
    """(command, flag, 'section.field') of every flag whose value a config field validates."""
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    found = []
    for command, p in sub.choices.items():
        for action in p._actions:
            field = getattr(action.type, "__name__", "")
            if "." in field:
                found.append((command, action.option_strings[0], field))
    return found


def test_every_matching_flag_is_derived_from_the_config():
    from hf_permerge.config import AlignmentSection

    flags = {field for command, _, field in _mirrored_flags() if command == "merge"}
    bools = {f"alignment.{k}" for k, v in AlignmentSection.model_fields.items() if v.annotation is bool}
    assert flags | bools == {f"alignment.{k}" for k in AlignmentSection.model_fields}


@pytest.mark.parametrize("command,flag,field", _mirrored_flags())
def test_a_flag_refuses_exactly_what_its_config_field_refuses(command, flag, field, capsys):
    section, key = field.split(".")
    for raw in VALUES:
        try:
            config_from_dict({section: {key: parse_yaml(raw)}})
            refusal = None
        except ConfigError as err:
            refusal = str(err).splitlines()[1].split(": ", 1)[1].split(" (got")[0]
        parser = cli.build_parser()
        args = [command, "p", "-o", "out", f"{flag}={raw}"]
        try:
            parser.parse_args(args)
            refused = None
        except SystemExit as stop:
            assert stop.code == 2
            refused = capsys.readouterr().err
        if refusal is None:
            assert refused is None, f"{flag} {raw}: the config accepts it, the flag refused it: {refused}"
        else:
            assert refused is not None, f"{flag} {raw}: the config refuses it ({refusal}), the flag accepted it"
            assert refusal.removeprefix("Value error, ") in refused


def test_non_finite_numbers_are_refused_by_config_and_flags(capsys):
    for key, value in (("training.lr", ".inf"), ("training.weight_decay", ".nan"), ("alignment.damping", ".inf")):
        section, field = key.split(".")
        with pytest.raises(ConfigError, match=f"{key}: Input should be a finite number"):
            config_from_dict({section: {field: parse_yaml(value)}})
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["merge", "p", "-o", "o", "--alpha", "nan"])
    assert "must be a finite number" in capsys.readouterr().err


def test_help_version_and_argument_errors_import_nothing_heavy():
    """`hf-permerge --help`, `--version` and an argument error answer before torch, transformers, datasets or
    evaluate are imported (they cost seconds); the heavy imports come when a command runs."""
    code = (
        "import sys\nimport hf_permerge.cli as cli\n"
        "for argv in (['--help'], ['--version'], ['merge', '--help'], ['merge', 'p', '-o', 'o', '--damping', '0'],"
        " ['train'], ['run', 'c', '-o', 'o', '--resume', '--overwrite']):\n"
        "    try:\n        cli.build_parser().parse_args(argv)\n    except SystemExit:\n        pass\n"
        "heavy = [m for m in ('torch', 'transformers', 'datasets', 'evaluate', 'accelerate') if m in sys.modules]\n"
        "print('HEAVY', heavy)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120).stdout
    assert "HEAVY []" in out


def test_import_hf_permerge_still_registers_the_models_with_transformers():
    code = (
        "import hf_permerge\nfrom transformers import AutoConfig\n"
        "print(type(AutoConfig.for_model('perm_mlp')).__name__, type(AutoConfig.for_model('perm_cnn')).__name__)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.stdout.split() == ["PermMLPConfig", "PermCNNConfig"], out.stderr[-2000:]


def test_every_subcommand_of_the_parser_has_its_command_and_no_command_is_unreachable():
    """The parser names the subcommands and `commands.COMMANDS` runs them: the two lists must be the same."""
    import argparse

    from hf_permerge.cli import build_parser, commands

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    assert set(sub.choices) == set(commands.COMMANDS)
