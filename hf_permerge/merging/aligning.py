"""Aligning the nets of a merge onto net 0 (or onto their average): one `Permutations` per net, and the
record of how they were found (alignment.json)."""

from __future__ import annotations

import dataclasses
import time
from contextlib import contextmanager

from ..alignment import Permutations, get_matcher
from ..alignment.average import REFERENCES, align_activations_jointly, align_to_average
from .merge_data import GIVEN, MergeData
from .nets import Nets


def align_nets(
    nets: Nets,
    data: MergeData,
    dataset=None,
    matcher: str = "activation",
    checkpoint: str | None = None,
    reference: str = "net_0",
    max_rounds: int = 50,
    heads: str = "move",
    **settings,
) -> tuple[list[Permutations], dict]:
    """(permutations, alignment record) as `PermMerger.align` describes them."""
    if heads not in HEADS:
        raise ValueError(f"heads={heads!r} is not supported; choose one of {list(HEADS)}")
    if reference not in REFERENCES:
        raise ValueError(f"reference={reference!r} is not supported; choose one of {list(REFERENCES)}")
    if reference == "average" and max_rounds < 1:
        raise ValueError(f"max_rounds={max_rounds} must be >= 1")
    if reference == "average" and matcher not in ("activation", "weight"):
        raise ValueError(
            f"reference='average' is implemented for the activation and weight matchers, not "
            f"{matcher!r}; use reference='net_0'"
        )
    if reference == "average" and matcher == "activation" and nets.spec.couplings:
        raise ValueError(
            "reference='average' with activations does not handle attention heads (coupled groups) "
            "yet; use reference='net_0', or the weight matcher"
        )
    checkpoint = checkpoint or nets.default_checkpoint
    if matcher == "gradient" and nets.is_text(nets.load(0, checkpoint)):
        raise ValueError(
            "the gradient matcher (Appendix B) follows a classifier's loss on labelled images, and these are language "
            "models: align them with the weight or the activation matcher (--matcher weight / activation)"
        )
    m = get_matcher(matcher, **settings)
    if not getattr(m, "gives_permutations", True):
        raise ValueError(
            f"matcher {matcher!r} finds transforms beyond permutations, which the merger does not average yet: use "
            f"get_matcher({matcher!r}, ...).match(model_a, model_b) and hf_permerge.alignment.transforms.merge_aligned"
        )
    given = dataset is not None and matcher != "weight"  # the weight matcher reads no data
    if matcher == "weight":
        dataset = None
    elif given:
        dataset = data.tensor_split(nets, dataset, getattr(m, "num_examples", None), getattr(m, "seed", 0))
    else:
        dataset = data.default(nets, "align", getattr(m, "num_examples", None), getattr(m, "seed", 0))
    ref = nets.load(0, checkpoint)
    start = time.perf_counter()
    perms = [Permutations.identity(nets.spec)]
    others = [nets.load(i, checkpoint) for i in range(1, len(nets))]
    rounds = {}
    with heads_in_place([ref, *others], nets.spec, heads == "keep"):
        if reference == "average" and matcher == "activation":  # it finds the star alignment on its way
            perms, rounds = align_activations_jointly([ref, *others], m, dataset, None, max_rounds)
        elif hasattr(m, "match_many"):  # one net's Hungarian solves overlap the next net's statistics
            perms += m.match_many(ref, others, dataset)
        else:
            perms += [m.match(ref, other, dataset) for other in others]
        if reference == "average" and matcher == "weight":
            perms, rounds = align_to_average([ref, *others], m, dataset, perms, max_rounds)
    if reference == "average":
        rounds = {"reference": reference, "max_rounds": max_rounds, **rounds}
    record = dict(
        matcher=matcher,
        settings=dict(m.settings),  # the defaults filled in
        checkpoint=checkpoint,
        align_s=time.perf_counter() - start,
        **rounds,
        **({"heads": heads} if heads != "move" else {}),
        **(
            {"examples": min(len(dataset), getattr(m, "num_examples", None) or len(dataset))}
            if dataset is not None
            else {}
        ),  # the images used: fewer if fewer were given
        **({"data": GIVEN} if given else {"data": data.label()} if matcher != "weight" and data.choice else {}),
    )
    return perms, record


HEADS = ("move", "keep")


@contextmanager
def heads_in_place(models: list, spec, keep: bool):
    """While aligning, the models declare `spec` without its couplings when `keep`: blocked groups (attention
    heads) then permute units within each head and never move a head; a rigid group stays as it is. The
    permutations found are valid under the full spec too (a coupling that moves no block)."""
    if not keep or not spec.couplings:
        yield
        return
    kept = dataclasses.replace(spec, couplings=())
    saved = [m.__dict__.get("permutation_spec") for m in models]
    for m in models:
        m.permutation_spec = lambda: kept
    try:
        yield
    finally:
        for m, before in zip(models, saved):
            if before is None:
                del m.permutation_spec
            else:
                m.permutation_spec = before
