"""Where the nets of a merge come from: a pair folder, a Hub repo of a pair, or model folders / repo ids."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from ..hub import HubError, resolve_local_or_hub
from ..io_utils import missing_folder_error, only_a_local_path
from ..models.trust import check_no_remote_code
from ..records import PairRecord, read_record

logger = logging.getLogger(__name__)

CHECKPOINT_HELP = "checkpoints are 'init', 'final' or 'step-N' (see pair.json's 'checkpoints')"


@dataclass
class NetSource:
    """One net: a name (path or repo id, for messages), its checkpoint folders by name, and a `label` for
    what is saved or pushed (model cards, merge_config.json): the Hub repo id, or a path without the
    local folders above it, since a local absolute path means nothing on the Hub."""

    name: str
    checkpoints: dict[str, Path]
    hub_id: str | None = None
    label: str = ""
    passed: str = "final"
    """The checkpoint whose folder the user passed (a net or pair folder: final)."""
    commit: str | None = None
    """The Hub commit the files were downloaded at (None for a local folder)."""

    def __post_init__(self):
        self.label = self.label or self.hub_id or portable_path(self.name)

    def folder(self, checkpoint: str) -> Path:
        if checkpoint not in self.checkpoints:
            raise ValueError(
                f"net {self.name} has no checkpoint {checkpoint!r}; it has {sorted(self.checkpoints)} "
                f"({CHECKPOINT_HELP})"
            )
        return self.checkpoints[checkpoint]


def portable_path(path: str | Path, extra: int = 0) -> str:
    """A local path as it may be shown elsewhere: a relative path as given; an absolute one (or one that
    climbs out with `..`) by its last part, with its parent when that part is a checkpoint (`net_1/final`),
    and `extra` more parents (to tell two such paths apart)."""
    path = Path(path)
    if not path.is_absolute() and ".." not in path.parts and not str(path).startswith("~"):
        return path.as_posix()
    parts = [p for p in path.parts if p not in ("/", "..", "~")] or ["."]
    last = parts[-1]
    keep = 1 + extra + int(len(parts) > 1 and (last in ("init", "final") or last.startswith("step-")))
    return "/".join(parts[-keep:])


def distinct_labels(names: list[str]) -> list[str]:
    """`portable_path` of each name, with as many more parent folders as it takes to tell them apart
    (two runs' `/a/run1/net_0/final` and `/b/run2/net_0/final` become `run1/net_0/final`, `run2/...`)."""
    extra = [0] * len(names)
    while True:
        labels = [portable_path(n, e) for n, e in zip(names, extra)]
        clashes = [
            i
            for i, label in enumerate(labels)  # the same model twice keeps its short label
            if any(labels[j] == label and names[j] != names[i] for j in range(len(names)))
            and portable_path(names[i], extra[i] + 1) != label
        ]
        if not clashes:
            return labels
        for i in clashes:
            extra[i] += 1


def _is_model_folder(path: Path) -> bool:
    """config.json with safetensors weights: one file, or shards named by `model.safetensors.index.json`."""
    weights = (path / "model.safetensors").is_file() or (path / "model.safetensors.index.json").is_file()
    return (path / "config.json").is_file() and weights


def net_checkpoints(folder: Path) -> dict[str, Path]:
    """A net folder (init/, step-N/, final/) or a single model folder (its only checkpoint is 'final'), each refused
    if it names code (`check_no_remote_code`), before transformers reads any of them.

    A model folder that sits inside a net folder (net_i/final) brings its siblings along,
    so `merge(checkpoint="init")` works on `pair/net_1/final` too.
    """
    found = _net_checkpoints(folder)
    for path in found.values():
        check_no_remote_code(path)
    return found


def _net_checkpoints(folder: Path) -> dict[str, Path]:
    if _is_model_folder(folder):
        parent = folder.parent
        if folder.name in ("final", "init") or folder.name.startswith("step-"):
            found = (
                _net_checkpoints(parent) if any(_is_model_folder(p) for p in parent.iterdir() if p != folder) else {}
            )
            if folder.name in found:
                return found
        return {"final": folder}
    found = {
        p.name: p
        for p in sorted(folder.iterdir())
        if p.is_dir() and _is_model_folder(p) and (p.name in ("init", "final") or p.name.startswith("step-"))
    }
    if not found:
        raise FileNotFoundError(
            f"{folder} holds no model: expected config.json + model.safetensors (or model.safetensors.index.json "
            "and its shards), or "
            "checkpoint folders init/, step-N/, final/ (a net folder of a pair)"
        )
    return found


def resolve(path_or_id: str | Path, token: str | None = None, revision: str | None = None) -> tuple[Path, str | None]:
    """A local folder for a path or Hub repo id; the repo id too when it came from the Hub (downloaded at
    `revision` with `token`; both apply to repo ids only)."""
    path = Path(path_or_id).expanduser()
    if path.exists():
        if not path.is_dir():
            raise NotADirectoryError(f"{path} is a file; pass a pair folder, a model folder or a Hub repo id")
        return path, None
    text = str(path_or_id)
    if only_a_local_path(text):
        raise missing_folder_error(path)

    try:
        return Path(resolve_local_or_hub(text, revision, token=token)), text
    except HubError as err:
        if len(path.parts) == 1 or Path(path.parts[0]).is_dir():  # `Bx` or `models/vit_9`: most likely a typo
            raise missing_folder_error(path, f"; nor is it a Hub repo: {err}") from None
        raise


def _commit(folder: Path, hub_id: str | None) -> str | None:
    """The commit of a Hub snapshot: its cache folder is named by it (snapshots/<40 hex digits>)."""
    name = folder.name
    return name if hub_id and len(name) == 40 and all(c in "0123456789abcdef" for c in name) else None


def load_sources(spec, token: str | None = None, revision: str | None = None) -> tuple[list[NetSource], dict | None]:
    """Sources and pair.json (None for a list of models) from what a user passes to `from_pretrained`;
    `token` and `revision` are for Hub repo ids (a revision with local folders only is an error)."""
    if isinstance(spec, (str, Path)):
        folder, hub_id = resolve(spec, token, revision)
        if revision is not None and hub_id is None:
            raise ValueError(
                f"revision={revision!r} applies to Hub repo ids, but {spec} is a local folder; "
                "drop the revision, or pass the repo id"
            )
        pair_json = folder / "pair.json"
        if not pair_json.is_file():
            if _is_model_folder(folder):
                raise ValueError(
                    f"{spec} is a single model; merging needs at least two: pass a pair folder "
                    "or a list of >= 2 model folders / repo ids"
                )
            if (folder / "pair" / "pair.json").is_file():  # the output folder of `hf-permerge run`
                raise FileNotFoundError(
                    f"{spec} is the output of `hf-permerge run`, not a pair folder; its pair is {Path(spec) / 'pair'}"
                )
            raise FileNotFoundError(
                f"{spec} is not a pair folder (no pair.json); pass a pair folder written by "
                "`hf-permerge train`, or a list of model folders / repo ids"
            )
        pair = read_record(pair_json, PairRecord, "re-create the pair folder (hf-permerge train)")
        sources = []
        for i in range(int(pair["num_nets"])):
            net = folder / f"net_{i}"
            if not net.is_dir():
                raise FileNotFoundError(
                    f"pair folder {folder} lacks net_{i}/ (pair.json says {pair['num_nets']} nets); "
                    "was the training interrupted? resume it with --resume"
                )
            sources.append(
                NetSource(
                    f"{hub_id or folder}/net_{i}",
                    net_checkpoints(net),
                    hub_id,
                    label=f"{hub_id}/net_{i}" if hub_id else f"net_{i}",
                    commit=_commit(folder, hub_id),
                )
            )
        return sources, pair
    items = list(spec)
    if len(items) < 2:
        raise ValueError(f"merging needs at least two models, got {len(items)}")
    resolved = [resolve(item, token, revision) for item in items]
    folders = [folder.resolve() for folder, _ in resolved]
    for i, folder in enumerate(folders):
        if folder in folders[:i]:
            logger.warning(
                "%s and %s are the same model: their merge is that model itself", items[folders.index(folder)], items[i]
            )
    if revision is not None and not any(hub_id for _, hub_id in resolved):
        raise ValueError(
            f"revision={revision!r} applies to Hub repo ids, but all of {[str(i) for i in items]} "
            "are local folders; drop the revision, or pass repo ids"
        )
    labels = distinct_labels([str(item) for item in items])
    sources = []
    for item, (folder, hub_id), label in zip(items, resolved, labels):
        if (folder / "pair.json").is_file():
            raise ValueError(
                f"{item} is a pair folder, which holds its own nets: pass it alone, or pass model "
                f"folders (e.g. {item}/net_0 {item}/net_1)"
            )
        checkpoints = net_checkpoints(folder)
        passed = next((name for name, path in checkpoints.items() if path == folder), "final")
        sources.append(
            NetSource(
                str(item), checkpoints, hub_id, label=hub_id or label, passed=passed, commit=_commit(folder, hub_id)
            )
        )
    return sources, None
