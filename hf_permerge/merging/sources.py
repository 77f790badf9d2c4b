"""Where the nets of a merge come from: a pair folder, a Hub repo of a pair, or model folders / repo ids."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

CHECKPOINT_HELP = "checkpoints are 'init', 'final' or 'step-N' (see pair.json's 'checkpoints')"


@dataclass
class NetSource:
    """One net: a name (path or repo id, for model cards) and its checkpoint folders by name."""

    name: str
    checkpoints: dict[str, Path]
    hub_id: str | None = None

    def folder(self, checkpoint: str) -> Path:
        if checkpoint not in self.checkpoints:
            raise ValueError(f"net {self.name} has no checkpoint {checkpoint!r}; it has {sorted(self.checkpoints)} "
                             f"({CHECKPOINT_HELP})")
        return self.checkpoints[checkpoint]


def _is_model_folder(path: Path) -> bool:
    return (path / "config.json").is_file() and (path / "model.safetensors").is_file()


def net_checkpoints(folder: Path) -> dict[str, Path]:
    """A net folder (init/, step-N/, final/) or a single model folder (its only checkpoint is 'final').

    A model folder that sits inside a net folder (net_i/final) brings its siblings along,
    so `merge(checkpoint="init")` works on `pair/net_1/final` too.
    """
    if _is_model_folder(folder):
        parent = folder.parent
        if folder.name in ("final", "init") or folder.name.startswith("step-"):
            found = net_checkpoints(parent) if any(_is_model_folder(p) for p in parent.iterdir() if p != folder) else {}
            if folder.name in found:
                return found
        return {"final": folder}
    found = {p.name: p for p in sorted(folder.iterdir()) if p.is_dir() and _is_model_folder(p)
             and (p.name in ("init", "final") or p.name.startswith("step-"))}
    if not found:
        raise FileNotFoundError(f"{folder} holds no model: expected config.json + model.safetensors, or "
                                "checkpoint folders init/, step-N/, final/ (a net folder of a pair)")
    return found


def resolve(path_or_id: str | Path) -> tuple[Path, str | None]:
    """A local folder for a path or Hub repo id; the repo id too when it came from the Hub."""
    path = Path(path_or_id).expanduser()
    if path.exists():
        if not path.is_dir():
            raise NotADirectoryError(f"{path} is a file; pass a pair folder, a model folder or a Hub repo id")
        return path, None
    from ..hub import resolve_local_or_hub

    return Path(resolve_local_or_hub(str(path_or_id))), str(path_or_id)


def load_sources(spec) -> tuple[list[NetSource], dict | None]:
    """Sources and pair.json (None for a list of models) from what a user passes to `from_pretrained`."""
    if isinstance(spec, (str, Path)):
        folder, hub_id = resolve(spec)
        pair_json = folder / "pair.json"
        if not pair_json.is_file():
            if _is_model_folder(folder):
                raise ValueError(f"{spec} is a single model; merging needs at least two: pass a pair folder "
                                 "or a list of >= 2 model folders / repo ids")
            raise FileNotFoundError(f"{spec} is not a pair folder (no pair.json); pass a pair folder written by "
                                    "`hf-permerge train`, or a list of model folders / repo ids")
        pair = json.loads(pair_json.read_text())
        sources = []
        for i in range(int(pair["num_nets"])):
            net = folder / f"net_{i}"
            if not net.is_dir():
                raise FileNotFoundError(f"pair folder {folder} lacks net_{i}/ (pair.json says {pair['num_nets']} nets); "
                                        "was the training interrupted? resume it with --resume")
            sources.append(NetSource(f"{hub_id or folder}/net_{i}", net_checkpoints(net),
                                     f"{hub_id}" if hub_id else None))
        return sources, pair
    items = list(spec)
    if len(items) < 2:
        raise ValueError(f"merging needs at least two models, got {len(items)}")
    sources = []
    for item in items:
        folder, hub_id = resolve(item)
        sources.append(NetSource(str(item), net_checkpoints(folder), hub_id))
    return sources, None
