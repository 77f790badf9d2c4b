"""Language models along the linear path between two nets: held-out loss (and perplexity) per lambda, and the
barrier (paper eq. 2), for the vanilla average and the permuted one. Tokens stream through in batches."""

from __future__ import annotations

import math

import torch

from ..data.tokens import TokenSplit
from ..merging.averaging import average_state_dicts
from .barrier import loss_barrier

MASKED_SHARE = 0.15
"""Share of a masked LM's tokens hidden for its loss (BERT's), drawn once with a fixed seed: every lambda is
measured on the same masked positions."""


def _masked_positions(split: TokenSplit) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    return (torch.rand(split.input_ids.shape, generator=gen) < MASKED_SHARE) & split.attention_mask.bool().cpu()


def predicted_tokens(split: TokenSplit, masked_lm: bool) -> int:
    """How many tokens `token_loss` predicts (and averages over): a causal LM's every real token after a
    sequence's first, a masked LM's hidden ones; fewer than the split's tokens."""
    if masked_lm:
        return int(_masked_positions(split).sum())
    return int(split.attention_mask[:, 1:].cpu().sum())


@torch.no_grad()
def token_loss(model, split: TokenSplit, batch_size: int = 16, mask_token_id: int | None = None) -> float:
    """Mean cross-entropy per predicted token over `split`: the next token for a causal LM, the hidden tokens for a
    masked LM (`mask_token_id`); padding never counts."""
    device = next(model.parameters()).device
    total, count = 0.0, 0
    masked = _masked_positions(split) if mask_token_id is not None else None
    model.eval()
    for start in range(0, len(split), batch_size):
        rows = slice(start, min(start + batch_size, len(split)))
        ids = split.input_ids[rows].to(device)
        attention = split.attention_mask[rows].to(device)
        if masked is None:
            labels = ids.masked_fill(attention == 0, -100)
            logits = model(input_ids=ids, attention_mask=attention).logits[:, :-1].float()
            target = labels[:, 1:]
        else:
            hidden = masked[rows].to(device)
            logits = model(input_ids=ids.masked_fill(hidden, mask_token_id), attention_mask=attention).logits.float()
            target = ids.masked_fill(~hidden, -100)
        loss = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), target.reshape(-1), ignore_index=-100, reduction="sum"
        )
        total += float(loss)
        count += int((target != -100).sum())
    if count == 0:
        raise ValueError("the held-out text has no token to predict: give sequences of at least two tokens")
    return total / count


def text_curves(
    merger,
    split: TokenSplit,
    num_lambdas: int = 11,
    checkpoint: str | None = None,
    other: int = 1,
    batch_size=16,
    step=lambda path, lam, loss: None,
) -> dict:
    """Held-out loss along lambda for the vanilla and the permuted average of net 0 and net `other` (the merger
    aligned), their barriers, and the share of the vanilla loss barrier that alignment removes.

    {"lambdas", "vanilla": {"loss", "perplexity"}, "permuted": {...}, "barrier": {"vanilla", "permuted"},
    "removed": share, "log_vocab": ln V (a uniform guess's loss), "predicted_tokens"}. `step(path, lam, loss)` is
    called after each lambda (progress)."""
    lambdas = [i / (num_lambdas - 1) for i in range(num_lambdas)]
    model = merger.load(0, checkpoint)
    probe = type(model)(model.config).to(device=next(model.parameters()).device, dtype=model.dtype)
    tokenizer = merger._nets.tokenizer()
    mask_id = getattr(tokenizer, "mask_token_id", None) if "MaskedLM" in type(model).__name__ else None
    if "MaskedLM" in type(model).__name__ and mask_id is None:
        raise ValueError("a masked LM's loss needs its tokenizer's mask token: save the tokenizer beside the model")
    out = {
        "lambdas": lambdas,
        "log_vocab": math.log(model.config.vocab_size),
        "predicted_tokens": predicted_tokens(split, mask_id is not None),
    }
    start = merger.permuted_state(0, checkpoint)
    for path, permute in (("vanilla", False), ("permuted", True)):
        end = merger.permuted_state(other, checkpoint, permute=permute)
        losses = []
        for lam in lambdas:
            probe.load_state_dict(average_state_dicts([start, end], [1 - lam, lam]))
            losses.append(token_loss(probe, split, batch_size, mask_id))
            step(path, lam, losses[-1])
        out[path] = {"loss": losses, "perplexity": [math.exp(v) for v in losses]}
    out["barrier"] = {p: loss_barrier(lambdas, out[p]["loss"]).barrier for p in ("vanilla", "permuted")}
    van = out["barrier"]["vanilla"]
    out["removed"] = 1 - out["barrier"]["permuted"] / van if van > 0 else None
    return out
