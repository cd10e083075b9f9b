"""What a finished run did to the model's distribution on its own SFT data (docs/design.md §10).

The comparison across targets needs more than accuracy: γ = p targets are said to *sharpen* the
model (Anchored SFT, arXiv 2509.23753, Fig. 4: about 85% of tokens above p = 0.9 after DFT), to
drift from the base (its Fig. 1: KL to the base about 3x SFT's), and to collapse into loops where
they fail (DFT#14). Each is measured here on a fixed slice of the SFT set (its first
`SLICE` examples, the same for every run of one data set), from the final model folder:

- `observed_nll`, `mean_p_observed`: the NLL and the mean probability of the observed tokens;
- `share_p_above_0_9`: the share of those tokens with p > 0.9 (sharpening);
- `kl_from_prior`: KL(prior model ‖ run) per token, a lower bound computed from the stored top-k
  (the prior's top-k ids plus one bucket for the rest of the vocabulary: coarsening a
  distribution never raises a KL), when the run's prior set is at hand.

Collapse is measured where the samples are, by `evaluate.collapse_flags`.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.common.models import load_model
from pipeline.common.prior_schema import PriorRecord
from pipeline.data.tokens import Example
from pipeline.priors.engines import drop_ids_beyond

SLICE = 128
"""Examples of the SFT set the diagnostics read (the first ones, in the prepared order)."""
CHUNK = 512
"""Positions per log-softmax, so a 150k vocabulary never materialises a whole example's logits."""


@torch.no_grad()
def run_diagnostics(
    final: Path, examples: list[Example], priors: dict[int, PriorRecord] | None, device: str = "cpu"
) -> dict[str, Any]:
    """The diagnostics of the model in `final` on `examples[:SLICE]` (see the module docstring)."""
    model = load_model(final, dtype=torch.float32).to(device).eval()
    if priors is not None:  # a wider teacher's extra ids are no logit of this model (docs/design.md §3)
        drop_ids_beyond(priors, model.get_output_embeddings().weight.shape[0])
    nll: list[np.ndarray] = []
    kl: list[np.ndarray] = []
    chosen = examples[:SLICE]
    for example in chosen:
        ids = torch.from_numpy(example.input_ids.astype(np.int64)).to(device)[None]  # a copy: the cache is read-only
        hidden = model.base_model(input_ids=ids).last_hidden_state[0, :-1]
        scored = np.flatnonzero(example.completion[1:])  # position t predicts token t + 1
        head = model.get_output_embeddings()
        for start in range(0, len(scored), CHUNK):
            positions = torch.as_tensor(scored[start : start + CHUNK], device=device)
            logp = torch.log_softmax(head(hidden[positions]).double(), -1)
            observed = ids[0, positions + 1]
            nll.append(-logp.gather(1, observed[:, None])[:, 0].cpu().numpy())
            if priors is not None and example.index in priors:
                kl.append(_kl_lower_bound(priors[example.index], scored[start : start + CHUNK], logp.cpu()))
    every = np.concatenate(nll) if nll else np.zeros(0)
    out: dict[str, Any] = {"slice_examples": len(chosen), "slice_tokens": int(every.size)}
    if every.size:
        p = np.exp(-every)
        out |= {
            "observed_nll": float(every.mean()),
            "mean_p_observed": float(p.mean()),
            "share_p_above_0_9": float((p > 0.9).mean()),
        }
    out["kl_from_prior"] = float(np.concatenate(kl).mean()) if kl else None
    return out


def _kl_lower_bound(record: PriorRecord, positions: np.ndarray, logp: torch.Tensor) -> np.ndarray:
    """Per position, KL(prior ‖ model) over the prior's top-k ids plus one bucket for the rest."""
    rows = np.searchsorted(record.positions, positions)
    if not np.array_equal(record.positions[rows], positions):
        raise ValueError("the prior set's scored positions differ from the example's")  # a bug, not an input
    ids = torch.as_tensor(record.topk_ids[rows], dtype=torch.long).clamp(min=0)  # -1 entries: -inf, masked below
    prior = torch.as_tensor(record.topk_logprobs[rows], dtype=torch.float64)
    model = logp.gather(1, ids)
    prior_p = prior.exp()
    finite = torch.isfinite(prior)
    head = torch.where(finite, prior_p * (prior - model), torch.zeros_like(prior)).sum(1)
    prior_rest = (1 - prior_p.where(finite, torch.zeros_like(prior_p)).sum(1)).clamp(min=0)
    model_rest = (1 - model.exp().sum(1)).clamp(min=1e-300)
    rest = torch.where(prior_rest > 1e-12, prior_rest * (prior_rest.clamp(min=1e-300).log() - model_rest.log()), 0.0)
    return (head + rest).clamp(min=0).numpy()


def loops(tokens: list[int], n: int = 4, min_tokens: int = 16) -> bool:
    """A sample that repeats itself: fewer than half of its n-grams are distinct (`22. 22. 22.`)."""
    if len(tokens) < min_tokens:
        return False
    grams = [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]
    return len(set(grams)) < 0.5 * len(grams)


def fmt(value: float | None, digits: int = 3) -> str:
    """A diagnostic for a table: `-` when it was not measured."""
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"
