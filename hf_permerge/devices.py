"""The torch device a command or call runs on: one that this machine has, or a one-line refusal before any work."""

from __future__ import annotations

import torch


def default_device() -> torch.device:
    """What runs when no device is named: the GPU when CUDA sees one, else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def check_device(device=None, cli: bool = False) -> torch.device:
    """`device` (a name such as "cuda:1", or a `torch.device`; None: `default_device()`) as a `torch.device` this
    machine can run on. Otherwise a ValueError of one line naming the device, why, and what to use instead (`cli`:
    in the command line's words, `--device cpu`; else `device='cpu'`): a model moved to an absent device fails
    deep inside torch, after the loading and reading that came first."""
    if device is None:
        return default_device()
    use = (lambda name: f"--device {name}") if cli else (lambda name: f"device={name!r}")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise ValueError(
            f"device {str(device)!r} is not a device name torch knows; use {use('cpu')}, {use('cuda')}, "
            f"{use('cuda:N')} or {use('mps')}"
        ) from None
    if dev.type == "cpu":
        return dev
    why, instead = _unavailable(dev)
    if why:
        raise ValueError(f"device {str(device)!r} is not available: {why}; use {use(instead)}")
    return dev


def _unavailable(dev: torch.device) -> tuple[str, str]:
    """(why this machine cannot run on `dev`, the device to name instead), or ("", "") when it can."""
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            if not torch.backends.cuda.is_built():
                return "torch was built without CUDA", "cpu"
            return "CUDA sees no GPU on this machine (check the driver and CUDA_VISIBLE_DEVICES)", "cpu"
        count = torch.cuda.device_count()
        if dev.index is not None and dev.index >= count:
            gpus = "cuda:0" if count == 1 else f"cuda:0 to cuda:{count - 1}"
            return f"this machine has {count} CUDA GPU{'s' if count != 1 else ''} ({gpus})", "cuda:0"
        return "", ""
    if dev.type == "mps":
        if not torch.backends.mps.is_available():
            return "MPS (the GPU of Apple silicon) is not available on this machine", "cpu"
        return "", ""
    backend = getattr(torch, dev.type, None)  # torch.xpu and the like
    if backend is None or not callable(getattr(backend, "is_available", None)) or not backend.is_available():
        return f"torch can use no {dev.type} device on this machine", "cpu"
    count = backend.device_count() if callable(getattr(backend, "device_count", None)) else 1
    if dev.index is not None and dev.index >= count:
        return f"this machine has {count} {dev.type} device{'s' if count != 1 else ''}", f"{dev.type}:0"
    return "", ""
