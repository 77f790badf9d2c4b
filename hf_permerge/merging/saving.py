"""What a merge writes and shares: merge_config.json, the model card, the merged folder, a Hub push; and the
folders of permutations (`alignment.json` + net_i.safetensors) that `hf-permerge align` writes and merge reads."""

from __future__ import annotations

import dataclasses
import functools
import shutil
import tempfile
from pathlib import Path

from ..alignment import Permutations
from ..alignment.tracing.build import permuted_share
from ..hub import check_repo_id, push_folder_to_hub
from ..io_utils import (
    PYTHON_WORDING,
    Wording,
    atomic_dir,
    check_output_dir,
    check_outside_inputs,
    folder_job,
    write_json_atomic,
)
from ..models.folders import auto_class_for, write_model_files
from ..records import AlignmentRecord, read_record
from .model_card import render_model_card, text_curve_tables

MARKER = "merge_config.json"
"""The file that marks a folder as a merged model of ours: the only kind `save_pretrained` may replace."""
PERMUTATIONS_MARKER = "alignment.json"
"""The file that marks a folder as a set of permutations of ours (`save_permutations`, `hf-permerge align`)."""
SAVE_TARGETS = {
    "merged model": (
        MARKER,
        (
            MARKER,
            "README.md",
            "config.json",
            "*.safetensors",
            "model.safetensors.index.json",
            "generation_config.json",
            "preprocessor_config.json",
            "tokenizer.json",
            "tokenizer_config.json",
            "special_tokens_map.json",
            "added_tokens.json",
            "chat_template.jinja",
            "vocab.*",
            "merges.txt",
            "*.model",
            "permutations",
            "report.json",
            "*.png",
        ),
    ),
    "set of permutations": (PERMUTATIONS_MARKER, (PERMUTATIONS_MARKER, "net_*.safetensors")),
}
ALIGNED_MARKER = "aligned_to.json"
"""The file that marks a folder as an aligned model of ours (`save_aligned`, `hf-permerge align --write-aligned`)."""
SAVE_TARGETS["aligned model"] = (ALIGNED_MARKER, (ALIGNED_MARKER, *SAVE_TARGETS["merged model"][1]))
"""What each output of the merger is marked by, and consists of (a transformers model's own files included):
--overwrite replaces only a folder of that kind, and refuses one holding anything else."""


def check_save_target(
    output_dir, overwrite: bool = False, what: str = "merged model", wording: Wording = PYTHON_WORDING
) -> Path:
    """`io_utils.check_output_dir`'s rule for one of `SAVE_TARGETS` ("merged model", "set of permutations"), in a
    Python caller's words by default (`overwrite=True`; the CLI passes its own, `--overwrite`)."""
    marker, contents = SAVE_TARGETS[what]
    return check_output_dir(output_dir, overwrite, marker=marker, what=f"a {what}", wording=wording, contents=contents)


def merge_settings(merger) -> dict:
    """merge_config.json of `merger`: what was merged and how. Sources by their portable labels (never local
    absolute paths: the file is pushed with the model); no alignment for a vanilla average, which used none."""
    permuted = merger._permuted_merge()
    return {
        "format": "hf_permerge.merge/1",
        "sources": [s.label for s in merger.sources],
        "hub_sources": [s.hub_id for s in merger.sources if s.hub_id],
        **(
            {"hub_commits": {s.hub_id: s.commit for s in merger.sources if s.commit}}
            if any(s.commit for s in merger.sources)
            else {}
        ),
        "merge": merger._last_merge,
        "alignment": dict(merger.alignment) if permuted else None,
        **(
            {"fingerprints": merger.fingerprints(merger.alignment.get("checkpoint"))}
            if merger.permutations is not None and permuted
            else {}
        ),
        "dataset": merger.described_dataset(),
        **({"tokenizers_differ": merger._nets.tokenizers_differ} if merger._nets.tokenizers_differ else {}),
        **(
            {
                "traced_spec": {
                    "groups": merger.spec.names,
                    "skipped": dict(merger.traced.skipped),
                    "head_couplings": [list(c) for c in merger.spec.couplings],
                }
            }
            if merger.traced is not None
            else {}
        ),
    }


def model_card(merger, model, report: dict | None = None, plots=(), command: str | None = None, repo_id=None):
    """The card of `merger`'s last merge, `model` (see `PermMerger.model_card`)."""
    last = merger._last_merge or {}
    text = (report or {}).get("kind") == "text"  # its curves are losses on text, not the image report's
    nets = last.get("nets", [0, 1])
    permuted = merger._permuted_merge()
    alignment = merger.alignment
    matcher = (
        {
            "name": alignment["matcher"],
            **(alignment.get("settings") or {}),
            **({"reference": "average"} if alignment.get("reference") == "average" else {}),
        }
        if permuted and alignment.get("matcher")
        else None
    )  # unknown for bare permutation files
    return render_model_card(
        {
            "base_models": [
                {
                    "name": merger.sources[i].label,
                    "hub": bool(merger.sources[i].hub_id),
                    "repo": merger.sources[i].hub_id,
                }
                for i in nets
            ],
            "nets": nets,
            "config": model.config.to_dict(),
            "dataset": merger.described_dataset(),
            "dataset_trained": merger.pair is not None,  # bare folders: the data they were merged with, not trained on
            "permuted": permuted,
            "matcher": matcher,
            "align_checkpoint": alignment.get("checkpoint") if permuted else None,
            "checkpoint": last.get("checkpoint", merger.default_checkpoint),
            "alpha": last.get("alpha", 0.5),
            "uniform": last.get("alpha", 0.5) is None,
            "repair": last.get("repair"),
            "repair_scale_only": last.get("repair_scale_only"),
            "traced_spec": (
                {
                    "groups": len(merger.spec.groups),
                    "skipped": sorted(merger.traced.skipped),
                    "kept": sorted(merger.traced.kept),
                    "share": f"{permuted_share(merger.spec, model.state_dict()):.0%}",
                }
                if merger.traced is not None and permuted
                else None
            ),
            "report": None if text else report,
            "text_curves": text_curve_tables(report) if text else None,
            "plots": list(plots),
            "command": command,
            "repo_id": repo_id,
            **task_of(model),
            "alignment_data": _alignment_data(alignment) if permuted else None,
            "tokenizers_differ": merger._nets.tokenizers_differ,
        }
    )


PIPELINE_TAGS = {
    "AutoModelForCausalLM": "text-generation",
    "AutoModelForMaskedLM": "fill-mask",
    "AutoModelForSequenceClassification": "text-classification",
    "AutoModelForImageClassification": "image-classification",
}


def task_of(model) -> dict:
    """{"auto_class", "pipeline_tag"} of a merged model: what loads it, and the Hub's name for its task."""
    auto = auto_class_for(model.config).__name__
    return {"auto_class": auto, "pipeline_tag": PIPELINE_TAGS[auto]}


def _alignment_data(alignment: dict) -> str | None:
    """What the permutations were found on, in a card's words: no data (weight matching), or the data's label."""
    if alignment.get("matcher") == "weight":
        return "none (weight matching reads only the weights)"
    data = alignment.get("data")
    examples = alignment.get("examples")
    return f"{data}{f', {examples} examples' if examples else ''}" if data else None


def input_folders(merger) -> list[Path]:
    """Every folder the merger reads: each net's checkpoint folders (an output must lie outside all of them)."""
    return [path for source in merger.sources for path in source.checkpoints.values()]


def save_merged(
    merger,
    output_dir,
    model=None,
    report: dict | None = None,
    files=(),
    command: str | None = None,
    overwrite: bool = False,
) -> Path:
    """The merged folder of `merger` (see `PermMerger.save_pretrained`), written as one job (`io_utils.folder_job`):
    a merge that `overwrite` replaces stays as it was unless the new one is written whole."""
    check_outside_inputs(output_dir, input_folders(merger), overwrite, PYTHON_WORDING)
    check = functools.partial(check_save_target, output_dir, overwrite)
    output_dir = check()  # before a default merge is made
    if model is None:
        model = merger._last_merged_model()
    perms = merger._require_alignment() if merger._permuted_merge() else None
    with folder_job(output_dir, check, overwrite) as (out, _), atomic_dir(out) as tmp:
        write_model_files(model, tmp)
        processor = merger._nets.preprocessor_of(model)  # a text model's tokenizer, else its image processor
        if processor is not None:
            processor.save_pretrained(tmp)
        if perms is not None:
            (tmp / "permutations").mkdir()
            for i, p in enumerate(perms):
                p.save(tmp / "permutations" / f"net_{i}.safetensors")
        write_json_atomic(tmp / MARKER, merge_settings(merger))
        names = []
        for f in map(Path, files):
            shutil.copy2(f, tmp / f.name)
            names.append(f.name)
        if report is not None:
            write_json_atomic(tmp / "report.json", report)
        plots = [n for n in names if n.endswith(".png")]
        model_card(merger, model, report, plots, command).save(tmp / "README.md")
    return output_dir


def save_aligned(merger, i: int, output_dir, checkpoint: str | None = None, overwrite: bool = False) -> Path:
    """Net i permuted onto net 0 as an ordinary model folder (see `PermMerger.save_aligned`), written as one job."""
    check_outside_inputs(output_dir, input_folders(merger), overwrite, PYTHON_WORDING)
    check = functools.partial(check_save_target, output_dir, overwrite, "aligned model")
    output_dir = check()
    model = merger.permuted(i, checkpoint)
    with folder_job(output_dir, check, overwrite) as (out, _), atomic_dir(out) as tmp:
        write_model_files(model, tmp)
        processor = merger._nets.preprocessor_of(model)
        if processor is not None:
            processor.save_pretrained(tmp)
        write_json_atomic(
            tmp / ALIGNED_MARKER,
            {
                "format": "hf_permerge.aligned/1",
                "source": merger.sources[i].label,
                "reference": merger.sources[0].label,
                "checkpoint": checkpoint or merger.default_checkpoint,
                "alignment": {k: v for k, v in merger.alignment.items() if k != "align_s"},
            },
        )
    return output_dir


def push(merger, repo_id: str, output_dir=None, **kwargs):
    check_repo_id(repo_id)
    if output_dir is not None:
        return push_folder_to_hub(output_dir, repo_id, **kwargs)
    with tempfile.TemporaryDirectory(prefix="hf_permerge_push_") as tmp:
        save_merged(merger, Path(tmp) / "merged")
        return push_folder_to_hub(Path(tmp) / "merged", repo_id, **kwargs)


def save_permutations(merger, output_dir) -> Path:
    """`merger`'s permutations as a folder (see `PermMerger.save_permutations`), written as one job
    (`io_utils.folder_job`): an earlier set stays as it was unless the new one is written whole."""
    check = functools.partial(
        check_save_target,
        output_dir,
        overwrite=True,
        what="set of permutations",
        wording=dataclasses.replace(
            PYTHON_WORDING, overwrite="save_permutations, which replaces only an earlier set of permutations"
        ),
    )
    output_dir = check()
    perms = merger._require_alignment()
    with folder_job(output_dir, check, overwrite=True) as (out, _), atomic_dir(out) as tmp:
        for i, p in enumerate(perms):
            p.save(tmp / f"net_{i}.safetensors")
        write_json_atomic(
            tmp / PERMUTATIONS_MARKER,
            {
                **merge_settings(merger),
                "merge": None,
                "alignment": dict(merger.alignment),
                "fingerprints": merger.fingerprints(merger.alignment.get("checkpoint")),
            },
        )  # also after a vanilla merge
    return output_dir


def read_permutations(folder, num_nets: int, fingerprints=None) -> tuple[list[Permutations], dict]:
    """(permutations, alignment record) of a folder `save_permutations` wrote (or a merged model's permutations/),
    refused unless found for `num_nets` nets with the weights `fingerprints(checkpoint)` gives (None: unchecked)."""
    folder = Path(folder)
    found = len(list(folder.glob("net_*.safetensors")))
    if found and found != num_nets:
        raise ValueError(
            f"{folder} holds permutations of {found} nets, and this merge has {num_nets}: they "
            "were found for other nets. Align these nets instead (merger.align(), or hf-permerge "
            "merge without --permutations)"
        )
    record = next(
        (
            read_record(f, AlignmentRecord, "pass the folder written by `hf-permerge align`")
            for f in (folder / PERMUTATIONS_MARKER, folder.parent / MARKER)
            if f.is_file()
        ),
        {},
    )
    saved = record.get("fingerprints")
    if fingerprints is not None and saved:
        ours = fingerprints((record.get("alignment") or {}).get("checkpoint"))
        if list(saved) != ours:
            differ = [f"net {i}" for i, (a, b) in enumerate(zip(saved, ours)) if a != b]
            raise ValueError(
                f"{folder} holds permutations found for other nets (other weights in {', '.join(differ)}"
                "). Align these nets instead (merger.align(), or hf-permerge merge without "
                "--permutations)"
            )
    perms = []
    for i in range(num_nets):
        path = folder / f"net_{i}.safetensors"
        if not path.is_file():
            raise FileNotFoundError(
                f"{folder} lacks net_{i}.safetensors; pass the folder written by "
                "`hf-permerge align` (or a merge's permutations/ folder)"
            )
        perms.append(Permutations.load(path))
    return perms, record.get("alignment") or {}
