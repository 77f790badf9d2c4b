"""A device this machine lacks is refused in one line, naming it and the fix, before any work: by every command that
takes --device, by the merger, the evaluation and the trainer."""

from __future__ import annotations

import argparse

import pytest
import torch

from hf_permerge.devices import check_device


@pytest.fixture
def one_gpu(monkeypatch):
    """A machine whose CUDA sees exactly one GPU (nothing is ever moved to it in these tests)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)


@pytest.fixture
def no_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)


ABSENT = {
    "cuda": ("no_gpu", "use --device cpu"),
    "cuda:3": ("one_gpu", "this machine has 1 CUDA GPU (cuda:0); use --device cuda:0"),
    "mps": ("no_gpu", "MPS (the GPU of Apple silicon) is not available on this machine; use --device cpu"),
    "gpu": ("no_gpu", "is not a device name torch knows; use --device cpu"),
}
"""Each device a test names, the machine it is named on, and what the refusal must say."""


@pytest.mark.parametrize("device", ABSENT)
def test_an_absent_or_malformed_device_is_one_line_naming_it_and_the_fix(device, request):
    machine, says = ABSENT[device]
    request.getfixturevalue(machine)
    with pytest.raises(ValueError) as err:
        check_device(device, cli=True)
    message = str(err.value)
    assert "\n" not in message and message.startswith(f"device {device!r} ") and says in message
    with pytest.raises(ValueError, match=r"use device='(cpu|cuda:0)'"):  # a Python caller is told its own words
        check_device(device)


def test_cuda_without_cuda_says_why(no_gpu):
    with pytest.raises(
        ValueError, match=r"^device 'cuda' is not available: (torch was built without CUDA|CUDA sees no GPU)"
    ):
        check_device("cuda")


def test_devices_this_machine_has_pass(one_gpu):
    assert check_device("cpu") == torch.device("cpu")
    assert check_device("cuda:0") == torch.device("cuda", 0)
    assert check_device(torch.device("cuda")) == torch.device("cuda")
    assert check_device(None) == torch.device("cuda")  # the default: the GPU when there is one


def test_the_default_is_the_cpu_without_a_gpu(no_gpu):
    assert check_device(None) == torch.device("cpu")


def subcommands_with_device() -> list[str]:
    """Every subcommand of the parser that takes --device, read from the parser itself (a new one is walked too)."""
    from hf_permerge.cli import build_parser

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return sorted(
        name
        for name, parser in sub.choices.items()
        if any("--device" in action.option_strings for action in parser._actions)
    )


def test_the_commands_that_take_device_are_the_ones_walked():
    assert subcommands_with_device() == ["align", "evaluate", "merge"]


@pytest.mark.parametrize("device", ABSENT)
@pytest.mark.parametrize("command", subcommands_with_device())
def test_every_command_with_device_refuses_an_absent_one_in_one_line_before_any_work(
    command, device, request, tiny_pair, tmp_path, monkeypatch, run_cli, capsys
):
    from hf_permerge.merging import merger

    request.getfixturevalue(ABSENT[device][0])

    def no_work(*args, **kwargs):
        raise AssertionError("the nets were read before the device was checked")

    monkeypatch.setattr(merger, "load_sources", no_work)
    out = tmp_path / "new" / "out"
    assert run_cli(command, tiny_pair, "-o", out, "--device", device) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith(f"hf-permerge {command}: error: device {device!r} ") and ABSENT[device][1] in err
    assert not (tmp_path / "new").exists()


def test_the_merger_and_evaluation_refuse_an_absent_device_before_reading_any_net(
    one_gpu, tiny_pair, tmp_path, monkeypatch
):
    from hf_permerge.merging import PermMerger, merger
    from hf_permerge.reporting.pipeline import evaluate_pair

    def no_work(*args, **kwargs):
        raise AssertionError("the nets were read before the device was checked")

    monkeypatch.setattr(merger, "load_sources", no_work)
    with pytest.raises(ValueError, match=r"^device 'cuda:3' is not available: this machine has 1 CUDA GPU"):
        PermMerger.from_pretrained(tiny_pair, device="cuda:3")
    with pytest.raises(ValueError, match=r"^device 'cuda:1' is not available"):
        evaluate_pair(tiny_pair, tmp_path / "e", device="cuda:1")
    assert not (tmp_path / "e").exists()


def test_the_trainer_refuses_an_absent_device(one_gpu, tiny_config, tmp_path):
    from hf_permerge.sweeps.runner import OneProcess
    from hf_permerge.training import PairTrainer

    class Accelerator(OneProcess):
        def __init__(self, device):
            self.device = device  # as a user's own accelerator-like object might hold it

    with pytest.raises(ValueError, match=r"^device 'cuda:2' is not available"):
        PairTrainer(tiny_config(), tmp_path / "c", accelerator=Accelerator("cuda:2"), progress=False)
    with pytest.raises(ValueError, match=r"^device 'mps' is not available"):
        OneProcess("mps")
    assert not (tmp_path / "c").exists()
