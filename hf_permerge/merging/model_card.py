"""The model card of a merged model: Hub metadata (base models, data, model-index) plus a readable body.

Rendered from `MODEL_CARD_TEMPLATE.md` (shipped as `hf_permerge/templates/MODEL_CARD_TEMPLATE.md`) with
`huggingface_hub.ModelCard.from_template`, so `ModelCard.load(repo_id)` parses it back.
"""

from __future__ import annotations

import math
import re
import shlex
from pathlib import Path
from typing import Any

from huggingface_hub import EvalResult, ModelCard, ModelCardData

from ..data.catalog import DATASETS
from ..hub import LOCAL_REPO_PLACEHOLDER
from .sources import portable_path

TEMPLATE_PATH = Path(__file__).resolve().parent.parent / "templates" / "MODEL_CARD_TEMPLATE.md"

ARCHITECTURES = {"mlp": "MLP", "cnn": "CNN"}
DATASET_NAMES = {"fashion_mnist": "Fashion-MNIST", "mnist": "MNIST", "cifar10": "CIFAR-10"}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def _get(tree: Any, *keys, default=None):
    """tree[k0][k1]... or `default` when any level is missing."""
    for key in keys:
        if isinstance(tree, dict) and key in tree:
            tree = tree[key]
        elif isinstance(tree, (list, tuple)) and isinstance(key, int) and -len(tree) <= key < len(tree):
            tree = tree[key]
        else:
            return default
    return tree


def _metric(tree: Any, name: str):
    """`acc` or `loss` from a {loss, acc} dict (also accepting `accuracy`)."""
    if not isinstance(tree, dict):
        return None
    value = tree.get(name, tree.get("accuracy") if name == "acc" else None)
    return float(value) if isinstance(value, (int, float)) else None


def _fmt(value, digits: int = 4) -> str:
    if value is None:
        return "–"
    if isinstance(value, float) and math.isnan(value):
        return "nan"
    return f"{value:.{digits}f}"


def _base_models(entries) -> list[dict]:
    """Normalise base-model entries to {"name", "hub", "repo"}; a bare string counts as a Hub id when shaped
    like one. A local name that is an absolute path is cut to its portable part: the card is pushed."""
    out = []
    for entry in entries or []:
        entry = entry if isinstance(entry, dict) else {"name": entry}
        name = str(entry["name"])
        hub = bool(entry.get("hub", _HUB_ID.match(name)))
        out.append(
            {
                "name": name if hub else portable_path(name),
                "hub": hub,
                "repo": str(entry.get("repo") or name) if hub else None,
            }
        )
    return out


def portable_command(command: str | None) -> str | None:
    """The command with its absolute paths (a bare argument, or `--option=/path`) cut to their portable
    part: the card is pushed, and a local folder such as /tmp/me/run/pair means nothing elsewhere."""
    if not command:
        return command
    try:
        args = shlex.split(command)
    except ValueError:  # not shell-quoted (a hand-written command): keep it as it is
        return command
    out = []
    for arg in args:
        option, sep, value = arg.partition("=") if arg.startswith("-") else ("", "", arg)
        out.append(f"{option}{sep}{portable_path(value)}" if value.startswith(("/", "~")) else arg)
    return shlex.join(out)


def _architecture(info: dict) -> str:
    arch = info.get("architecture") or _get(info, "config", "model_type", default="")
    return str(arch).lower().removeprefix("perm_")


def _architecture_details(arch: str, config: dict | None) -> str:
    if not config:
        return ""
    if arch == "mlp" and "depth" in config:
        return f"{config['depth']} hidden layer{'s' if config['depth'] != 1 else ''} of {config.get('width')} units"
    if arch == "cnn" and "layers" in config:
        return f"layers {config['layers']}" + (", batch norm" if config.get("batch_norm") else "")
    return ""


def _dataset(name: str | None) -> tuple[str | None, str | None]:
    """(display name, Hub id) of a data set named in our catalog, or taken as a Hub id as is."""
    if not name:
        return None, None
    if name in DATASETS:
        return DATASET_NAMES.get(name, name), DATASETS[name].hub_id
    return name, name


def text_curve_tables(report: dict) -> list[dict]:
    """The card's tables of a text report.json (`reporting.text_report`): per checkpoint and split, loss and
    perplexity along λ, vanilla and permuted, with the barriers and the tokens predicted."""
    tables = []
    for checkpoint, by_split in (report.get("curves") or {}).items():
        for split, c in by_split.items():
            rows = [
                {
                    "lam": f"{lam:g}",
                    **{f"{p}_loss": _fmt(c[p]["loss"][i]) for p in ("vanilla", "permuted")},
                    **{f"{p}_ppl": f"{c[p]['perplexity'][i]:.2f}" for p in ("vanilla", "permuted")},
                }
                for i, lam in enumerate(c["lambdas"])
            ]
            tables.append(
                {
                    "checkpoint": checkpoint,
                    "split": split,
                    "tokens": (report.get("predicted_tokens") or {}).get(split, "?"),
                    "barrier_vanilla": _fmt(c["barrier"]["vanilla"]),
                    "barrier_permuted": _fmt(c["barrier"]["permuted"]),
                    "rows": rows,
                }
            )
    return tables


def _curve_rows(curves: dict | None) -> list[dict]:
    """One row per λ, vanilla and permuted side by side (joined on λ)."""
    rows: dict[float, dict] = {}
    for path in ("vanilla", "permuted"):
        lambdas = _get(curves, path, "lambdas") or []
        for i, lam in enumerate(lambdas):
            row = rows.setdefault(round(float(lam), 9), {"lam": f"{float(lam):g}"})
            row[f"{path}_acc"] = _fmt(_metric({"acc": _get(curves, path, "test", "acc", i)}, "acc"))
            row[f"{path}_loss"] = _fmt(_metric({"loss": _get(curves, path, "test", "loss", i)}, "loss"))
    blank = {"vanilla_acc": "–", "vanilla_loss": "–", "permuted_acc": "–", "permuted_loss": "–"}
    return [{**blank, **rows[k]} for k in sorted(rows)]


def _merged_metrics(info: dict, report: dict, checkpoint: str, alpha: float | None, path: str, n: int) -> dict:
    """The merged model's measured test {acc, loss}: given, else read off the report where it measured this
    very merge: the `path` (vanilla or permuted) curve of nets 0 and 1 at alpha, or the n-way average of
    the first n nets (alpha None)."""
    given = _get(info, "merged", "test")
    if isinstance(given, dict):
        return {"acc": _metric(given, "acc"), "loss": _metric(given, "loss")}
    if alpha is None:
        if n == 2:
            alpha = 0.5
        else:
            avg = _get(report, "n_way", str(n), checkpoint, path, "test")
            return {"acc": _metric(avg, "acc"), "loss": _metric(avg, "loss")}
    if list(info.get("nets") or [0, 1]) != [0, 1]:
        return {"acc": None, "loss": None}  # the report's curves join nets 0 and 1 only
    if info.get("repair"):  # the curves are unrepaired; the report may hold the repaired midpoint
        repaired = _get(report, "repair", info["repair"], "midpoint", path, "test")
        if repaired is not None and abs(alpha - 0.5) < 1e-9:
            return {"acc": _metric(repaired, "acc"), "loss": _metric(repaired, "loss")}
        return {"acc": None, "loss": None}
    curve = _get(report, "curves", checkpoint, path) or {}
    for i, lam in enumerate(curve.get("lambdas") or []):
        if abs(float(lam) - alpha) < 1e-9:
            return {
                "acc": _metric({"acc": _get(curve, "test", "acc", i)}, "acc"),
                "loss": _metric({"loss": _get(curve, "test", "loss", i)}, "loss"),
            }
    if abs(alpha - 0.5) < 1e-9:
        mid = _get(report, "midpoint", checkpoint, path, "test")
        return {"acc": _metric(mid, "acc"), "loss": _metric(mid, "loss")}
    return {"acc": None, "loss": None}


def _models_phrase(checkpoint: str, n: int) -> str:
    """What the base models were at the merged checkpoint: the card must not call untrained inits trained."""
    if checkpoint == "init":
        return f"{n} untrained initialisations (the `init` checkpoints) of independently seeded models"
    if checkpoint == "final":
        return f"{n} independently trained models"
    return f"{n} independently seeded models at training checkpoint `{checkpoint}`"


def render_model_card(info: dict, template_path: str | Path | None = None):
    """Render the card of a merged model as a `huggingface_hub.ModelCard` (save it as README.md).

    `info` (every key optional unless marked; missing parts leave their section or row out):

    - `base_models` (list, required): the source models, each a Hub repo id (`"user/net-a"`), a local name
      (`"net_0/final"`), or `{"name": ..., "hub": bool}` to say which. Hub ids go to the `base_model`
      metadata; all of them go to `merged_from` and to the body.
    - `model_name` (str): title and model-index name; default: the name part of `repo_id`.
    - `repo_id` (str): where the card's model lives, for the loading snippet.
    - `architecture` (`"mlp"` | `"cnn"`): default from `config["model_type"]` (`perm_mlp` -> `mlp`).
    - `config` (dict): the merged model's config.json, for architecture details.
    - `dataset` (str): a catalog name (`"fashion_mnist"`, mapped to its Hub id) or a Hub dataset id.
    - `dataset_trained` (bool, default True): the models were trained on `dataset`. False: it is only the data
      the merge aligned, repaired or was measured on (models saved without a pair.json); the card says so and
      leaves it out of the `datasets` metadata, which on the Hub means training data.
    - `permuted` (bool, default True): the units were aligned before averaging; False: a vanilla average.
    - `matcher` (str or dict): `{"name": "activation", <setting>: <value>, ...}`; `align_checkpoint` (str):
      the checkpoint the permutations were found on (both only shown for a permuted merge).
    - `checkpoint` (str, default `"final"`): which checkpoint was merged (`"init"`: the untrained inits).
    - `alpha` (float, default 0.5): λ of a two-model merge `(1 - λ) θ_0 + λ θ_1`; `uniform` (bool): instead,
      the uniform average of all base models (weight 1/N each).
    - `nets` (list of int): the base models' net indices in the report (default 0, 1, ...), to pick their
      endpoint rows and measured numbers.
    - `repair` (`"repair"` | `"reset_bn"`): the correction applied after merging (see `hf_permerge.merging.repair`).
    - `repair_scale_only` (list of module names): layers REPAIR could only rescale, having no bias to shift.
    - `traced_spec` (`{"groups": int, "skipped": [module names], "kept": [...], "share": "93%"}`): the spec was
      traced, not hand-written; kept: groups left in place by design; share: of the parameters the spec moves.
    - `pipeline_tag` (str, default `"image-classification"`) and `auto_class` (the Auto class that loads it, for
      the loading snippet): a text model's, e.g. `"text-generation"` and `"AutoModelForCausalLM"`.
    - `alignment_data` (str): what the permutations were found on, when it is not a named Hub data set.
    - `tokenizers_differ` (str): how the models' tokenizers differ, when the merge was told to go on anyway
      (`allow_different_tokenizers`); the card says so beside the settings.
    - `text_curves` (list): a text evaluation's held-out loss along λ, each `{"checkpoint", "split", "tokens",
      "barrier_vanilla", "barrier_permuted", "rows": [{"lam", "vanilla_loss", "vanilla_ppl", ...}]}`
      (`text_curve_tables` of a text report.json).
    - `command` (str): the command that reproduces the merge (absolute paths in it are cut to their last part).
    - `plots` (list): repo-relative image paths, or `{"path": ..., "caption": ...}`.
    - `merged` (dict): `{"test": {"acc": float, "loss": float}}` measured on the merged model; default: the
      value the report measured for this merge (its permuted or vanilla curve at λ = alpha, its midpoint,
      its repaired midpoint, or its n-way average), else none.
    - `license` (str).
    - `report` (dict): report.json as written by the evaluation, of which these parts are read:
        `endpoints[i].{net, test.{loss,acc}, <checkpoint>.test.{loss,acc}}`,
        `curves.{final,init}.{vanilla,permuted}.lambdas` with `.test.{loss,acc}` (lists aligned with lambdas),
        `midpoint.{final,init}.{vanilla,permuted}.test.{loss,acc}`,
        `barrier.{final,init}.{vanilla,permuted}.{test,train}.{loss,acc}`,
        `repair.{mode, midpoint.{vanilla,permuted}.test}`, `n_way.<k>.<checkpoint>.{vanilla,permuted}.test`.

    Metadata: `library_name: hf_permerge`, tags (model-merging, permutation-alignment unless vanilla, the
    architecture, merge), `base_model` (Hub repos, each once), `merged_from` (all base models), `datasets`,
    `pipeline_tag: image-classification`, and a `model-index` with the merged model's test accuracy and loss
    and the barriers of the merged checkpoint (test split).
    """
    report = info.get("report") or {}
    base = _base_models(info.get("base_models"))
    if not base:
        raise ValueError("info['base_models'] must list the merged models (Hub repo ids or local names)")
    arch = _architecture(info)
    checkpoint = str(info.get("checkpoint") or "final")
    permuted = bool(info.get("permuted", True))
    uniform = bool(info.get("uniform"))
    alpha = None if uniform else float(info.get("alpha") if info.get("alpha") is not None else 0.5)
    nets = list(info.get("nets") or range(len(base)))
    dataset_name, dataset_id = _dataset(info.get("dataset"))
    dataset_trained = info.get("dataset_trained", True)  # False: the data of the merge, the models' own unknown
    repo_id = info.get("repo_id")
    model_name = info.get("model_name") or (repo_id.split("/")[-1] if repo_id else "hf_permerge-merged-model")
    matcher = info.get("matcher") or {}
    if isinstance(matcher, str):
        matcher = {"name": matcher}
    merged = _merged_metrics(info, report, checkpoint, alpha, "permuted" if permuted else "vanilla", len(base))

    barriers = []
    for ckpt in ("final", "init"):
        for path in ("vanilla", "permuted"):
            for split in ("test", "train"):
                values = _get(report, "barrier", ckpt, path, split)
                if isinstance(values, dict):
                    barriers.append(
                        {
                            "checkpoint": ckpt,
                            "path": path,
                            "split": split,
                            "loss": _fmt(_metric(values, "loss")),
                            "acc": _fmt(_metric(values, "acc")),
                        }
                    )

    eval_results = []
    pipeline_tag = info.get("pipeline_tag") or "image-classification"
    task = {
        "task_type": pipeline_tag,
        "dataset_type": dataset_id or "unknown",
        "dataset_name": dataset_name or "unknown",
        "dataset_split": "test",
    }
    if dataset_id:
        if merged["acc"] is not None:
            eval_results.append(
                EvalResult(**task, metric_type="accuracy", metric_value=merged["acc"], metric_name="Test accuracy")
            )
        if merged["loss"] is not None:
            eval_results.append(
                EvalResult(**task, metric_type="loss", metric_value=merged["loss"], metric_name="Test loss")
            )
        for path in ("permuted", "vanilla"):
            values = _get(report, "barrier", checkpoint, path, "test")
            for key, kind in (("loss", "loss"), ("acc", "accuracy")):
                value = _metric(values, key)
                if value is not None:
                    eval_results.append(
                        EvalResult(
                            **task,
                            metric_type=f"{kind}_barrier",
                            metric_value=value,
                            metric_name=f"{kind.capitalize()} barrier ({path}, {checkpoint})",
                        )
                    )

    hub_bases = list(dict.fromkeys(m["repo"] for m in base if m["hub"]))  # both nets of a Hub pair: one repo
    extra = {"merged_from": [m["name"] for m in base]}
    if hub_bases:
        extra["base_model_relation"] = "merge"
    card_data = ModelCardData(
        library_name="hf_permerge",
        license=info.get("license"),
        tags=["model-merging", *(["permutation-alignment"] if permuted else []), *([arch] if arch else []), "merge"],
        base_model=hub_bases or None,
        datasets=[dataset_id] if dataset_id and dataset_trained else None,
        pipeline_tag=pipeline_tag,
        metrics=["accuracy", "loss"] if eval_results else None,
        model_name=model_name if eval_results else None,
        eval_results=eval_results or None,
        **extra,
    )

    endpoints = []
    for i, endpoint in enumerate(report.get("endpoints") or []):
        net = _get(endpoint, "net", default=i)
        if net not in nets:
            continue  # a net of the pair that is not in this merge
        test = _get(endpoint if checkpoint == "final" else _get(endpoint, checkpoint), "test")  # at the merged one
        endpoints.append(
            {
                "name": f"endpoint: {base[nets.index(net)]['name']}",
                "acc": _fmt(_metric(test, "acc")),
                "loss": _fmt(_metric(test, "loss")),
            }
        )
    interpolation = [
        {"checkpoint": ckpt, "rows": rows}
        for ckpt in ("final", "init")
        if (rows := _curve_rows(_get(report, "curves", ckpt)))
    ]
    plots = [
        p if isinstance(p, dict) else {"path": str(p), "caption": Path(str(p)).stem.replace("_", " ")}
        for p in info.get("plots") or []
    ]

    return ModelCard.from_template(
        card_data,
        template_path=str(template_path or TEMPLATE_PATH),
        model_name=model_name,
        repo_id=repo_id or LOCAL_REPO_PLACEHOLDER,
        architecture_name=ARCHITECTURES.get(arch, arch),
        architecture_details=_architecture_details(arch, info.get("config")),
        base_models=base,
        dataset_name=dataset_name,
        dataset_id=dataset_id,
        dataset_trained=dataset_trained,
        permuted=permuted,
        models=_models_phrase(checkpoint, len(base)),
        matcher_name=matcher.get("name") if permuted else None,
        matcher_settings=[(k, v) for k, v in matcher.items() if k != "name"],
        aligned_jointly=permuted and matcher.get("reference") == "average",
        align_checkpoint=info.get("align_checkpoint") if permuted else None,
        checkpoint=checkpoint,
        alpha=f"{alpha:g}" if alpha is not None else None,
        one_minus_alpha=f"{1 - alpha:g}" if alpha is not None else None,
        uniform=uniform,
        repair=info.get("repair"),
        repair_scale_only=info.get("repair_scale_only") or [],
        traced_spec=info.get("traced_spec") if permuted else None,
        merged_acc=_fmt(merged["acc"]) if merged["acc"] is not None else "",
        merged_loss=_fmt(merged["loss"]) if merged["loss"] is not None else "",
        endpoints=endpoints,
        barriers=barriers,
        interpolation=interpolation,
        plots=plots,
        command=portable_command(info.get("command")),
        pipeline_tag=pipeline_tag,
        auto_class=info.get("auto_class") or "AutoModelForImageClassification",
        alignment_data=info.get("alignment_data"),
        tokenizers_differ=info.get("tokenizers_differ"),
        text_curves=info.get("text_curves") or [],
    )
