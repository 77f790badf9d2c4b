"""The evaluation of a pair of language models: held-out loss and perplexity along lambda, vanilla and permuted,
trained and at init, with the loss barriers; what `hf-permerge evaluate` writes for text models.

A trained LM pair (`hf-permerge train`) is aligned on its training blocks and measured on its held-out blocks
(and a fixed subset of its training blocks); model folders are measured on the held-out text the caller names,
and aligned by weight matching (matching on the text they are measured on would flatter the permuted path)."""

from __future__ import annotations

import math

from ..alignment.matchers import matcher_settings
from ..evaluation.text import text_curves
from ..training.splits import load_splits

TRAIN_SUBSET_SEED = 1
"""The training blocks the curves read are an independent draw from the matcher's (seed 0), as for images."""


TEXT_EVALUATION = ("num_lambdas", "plots", "splits", "train_subset")
"""The evaluation settings a text evaluation reads (model folders: the first two; their curves are on --dataset)."""


def text_evaluation_fields(models: bool) -> tuple[str, ...]:
    return TEXT_EVALUATION[:2] if models else TEXT_EVALUATION


def check_text_evaluation(config, heldout, models: bool, overrides=()) -> None:
    """Refusals before any work: model folders need held-out text and the weight matcher; an evaluation setting the
    text evaluation does not read (the plane, n-way averages, REPAIR ...) is refused by name, not ignored."""
    applies = text_evaluation_fields(models)
    for override in overrides or ():
        key = override.split("=", 1)[0].strip()
        section, _, field = key.partition(".")
        if section == "evaluation" and field not in applies:
            raise ValueError(
                f"--set {key}: the evaluation of language models {'given as model folders ' if models else ''}"
                f"measures held-out loss along lambda and reads only evaluation.{', evaluation.'.join(applies)}; "
                f"drop --set {key}"
            )
    if models and heldout is None:
        raise ValueError(
            "these are language models without a pair.json: name the held-out text their curves are measured on "
            "with --dataset (a .txt/.jsonl/.csv file, a saved Dataset or a Hub id; --text-column for its column)"
        )
    aligned_on = (heldout or {}).get("align")
    if models and config.alignment.matcher not in ("weight", "activation"):
        raise ValueError(
            f"alignment.matcher {config.alignment.matcher}: language models are aligned by weight or activation "
            "matching; set alignment.matcher=weight or activation"
        )
    if models and config.alignment.matcher == "activation" and aligned_on is None:
        raise ValueError(
            "alignment.matcher activation: language models without a pair.json are aligned by weight matching here "
            "(matching on the held-out text would flatter the permuted curve); name other text to align on with "
            "--align-dataset, or add --set alignment.matcher=weight"
        )
    if models and config.alignment.matcher == "weight" and aligned_on is not None:
        raise ValueError(
            "--align-dataset is text for a data matcher, and alignment.matcher is weight (it reads no text): add "
            "--set alignment.matcher=activation, or drop --align-dataset"
        )


def text_splits(merger, config, heldout=None) -> dict:
    """{name: TokenSplit}: the caller's held-out text ("heldout"), else the pair's splits as
    `evaluation.splits` names them (test: the held-out blocks; train: a fixed subset of the training blocks, as
    many as the held-out ones, at most `evaluation.train_subset`)."""
    if heldout is not None:
        return {"heldout": merger.token_split(heldout["dataset"], text_column=heldout.get("text_column"))}
    train, test = load_splits(config)
    train = train.subset(min(config.evaluation.train_subset, len(test)), seed=TRAIN_SUBSET_SEED)
    return {name: test if name == "test" else train for name in config.evaluation.splits}


def align_text(merger, config, aligned_on=None) -> None:
    """Align as the config's `alignment` section says; data matchers read `aligned_on` (model folders: the text of
    --align-dataset), else the pair's training blocks."""
    a = config.alignment
    data = None if a.matcher == "weight" else aligned_on if aligned_on is not None else load_splits(config)[0]
    merger.align(data, **alignment_arguments(config))


def alignment_arguments(config) -> dict:
    """`PermMerger.align`'s keywords from a run config's `alignment` section: the matcher, its own settings, and
    the merger's (checkpoint, reference, max_rounds, heads), the one place both the image and the text path read."""
    a = config.alignment
    settings = matcher_settings(a.matcher, a.model_dump())
    if a.subset == "per_seed" and "num_examples" in settings:  # a matcher that reads data
        settings["seed"] = config.training.seed
    return (
        dict(matcher=a.matcher, checkpoint=a.checkpoint, reference=a.reference, max_rounds=a.max_rounds, heads=a.heads)
        | settings
    )


def text_report(merger, config, splits: dict, pair, command: str | None, progress: bool = True) -> dict:
    """report.json of a text pair: per checkpoint (final; init when the nets kept it) and split, `text_curves`."""
    checkpoints = ["final"] + (["init"] if all("init" in s.checkpoints for s in merger.sources) else [])
    curves: dict = {}
    jobs = [(c, s) for c in checkpoints for s in splits]
    with Progress(len(jobs) * 2 * config.evaluation.num_lambdas, progress) as bar:
        for checkpoint, name in jobs:
            curves.setdefault(checkpoint, {})[name] = text_curves(
                merger,
                splits[name],
                config.evaluation.num_lambdas,
                checkpoint=checkpoint,
                step=lambda path, lam, loss, c=checkpoint, n=name: bar.step(
                    f"{c} {n} {path} λ={lam:.2f} loss {loss:.4f}"
                ),
            )
    return {
        "kind": "text",
        "pair": pair,
        "alignment": {k: v for k, v in merger.alignment.items() if k != "perms"},
        "tokens": {name: split.num_tokens for name, split in splits.items()},
        "predicted_tokens": {name: curves["final"][name]["predicted_tokens"] for name in splits},
        "curves": curves,
        "config": config.to_dict(),
        "command": command,
    }


class Progress:
    """One step per lambda measured: a bar on a terminal, else one line each on stderr (a log that a job's output
    keeps), so a long evaluation is never silent."""

    def __init__(self, total: int, shown: bool):
        import sys

        from tqdm.auto import tqdm

        self.total, self.done, self.shown = total, 0, shown
        self.terminal = sys.stderr.isatty()
        self.bar = tqdm(total=total, desc="text curves", leave=False) if shown and self.terminal else None

    def step(self, what: str) -> None:
        import sys

        self.done += 1
        if self.bar is not None:
            self.bar.update()
        elif self.shown:
            print(f"text curves {self.done}/{self.total}: {what}", file=sys.stderr, flush=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        if self.bar is not None:
            self.bar.close()


def text_summary(report: dict) -> str:
    """A few lines for the terminal: per checkpoint and split, the endpoints, the midpoints and the barriers."""
    lines = []
    for checkpoint, by_split in report["curves"].items():
        for name, c in by_split.items():
            van, perm = c["vanilla"]["loss"], c["permuted"]["loss"]
            mid = len(van) // 2
            removed = "" if c["removed"] is None else f", {c['removed']:.0%} of it removed"
            lines.append(
                f"{checkpoint} on {name} ({report['predicted_tokens'][name]} tokens predicted): loss {van[0]:.3f} / {van[-1]:.3f} at the "
                f"ends (ln V {c['log_vocab']:.3f}); midpoint vanilla {van[mid]:.3f}, permuted {perm[mid]:.3f} "
                f"(perplexity {math.exp(van[mid]):.1f} -> {math.exp(perm[mid]):.1f}); barrier "
                f"{c['barrier']['vanilla']:.3f} -> {c['barrier']['permuted']:.3f}{removed}"
            )
    return "\n".join(lines)


def plot_text_curves(report: dict, folder) -> list[str]:
    """text_curves.png: loss along lambda, vanilla and permuted, one panel per checkpoint."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = list(report["curves"])
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4), squeeze=False)
    for ax, checkpoint in zip(axes[0], panels):
        for name, c in report["curves"][checkpoint].items():
            for path, style in (("vanilla", "--"), ("permuted", "-")):
                ax.plot(c["lambdas"], c[path]["loss"], style, marker="o", ms=3, label=f"{path}, {name}")
        ax.axhline(c["log_vocab"], color="grey", lw=1, ls=":", label="ln V (uniform guess)")
        ax.set_title("trained" if checkpoint == "final" else f"{checkpoint} (permutation from the trained nets)")
        ax.set_xlabel("λ")
        ax.set_ylabel("loss per token (nats)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(folder / "text_curves.png", dpi=110)
    plt.close(fig)
    return ["text_curves.png"]
