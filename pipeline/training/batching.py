"""Batching for stage 2: global batches per step, each process's micro-batches, and collation.

A step takes `train.batch_size` examples over all processes; each process gets every world-th
example and splits its share into micro-batches (by count, or by a padded-token budget). The
update does not depend on the split, because the loss is divided by the step's global count of
scored tokens. `collate` turns a micro-batch into right-padded tensors with the priors aligned to
the shifted labels (docs/design.md §3).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from pipeline.common.prior_schema import Prior, PriorRecord
from pipeline.core.targets import IGNORE
from pipeline.data.tokens import Example, pad_rows
from pipeline.priors.engines import aligned_priors
from pipeline.training.config import TrainConfig


@dataclass
class Batch:
    """One micro-batch as tensors; labels and priors are already shifted (position t → t+1)."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor | None
    """Padded batches: 1 on tokens. Packed: None (the position ids separate the documents)."""
    labels: torch.Tensor
    prior: Prior | None
    position_ids: torch.Tensor | None = None
    """Packed batches: positions restarting at 0 at each document."""

    def to(self, device: str) -> Batch:
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        prior = None if self.prior is None else self.prior.map(lambda t: t.to(device))
        ids, labels = self.input_ids.to(device), self.labels.to(device)
        return Batch(ids, move(self.attention_mask), labels, prior, move(self.position_ids))


def collate(examples: list[Example], pad_id: int, priors: dict[int, PriorRecord] | None) -> Batch:
    """Right-padded tensors; labels and prior tensors aligned with `input_ids[:, 1:]`."""
    ids, mask = pad_rows([e.input_ids for e in examples], pad_id)
    completion, _ = pad_rows([e.completion for e in examples], 0)
    labels = torch.where(completion[:, 1:].bool(), ids[:, 1:], IGNORE)
    prior = None
    if priors is not None:
        records = [priors[e.index] for e in examples]
        prior = aligned_priors(records, [len(e.input_ids) for e in examples], ids.shape[1] - 1)
    return Batch(ids, mask, labels, prior)


def collate_packed(examples: list[Example], priors: dict[int, PriorRecord] | None) -> Batch:
    """The examples end to end in one row, no padding (`train.packing`).

    Position ids restart at 0 for each document, which is how transformers recognises a packed row
    and keeps attention inside each document (a block-causal mask for sdpa/eager/flex, varlen
    kernels for flash_attention_2). A document's first token is never a label: the position before
    it belongs to the previous document.
    """
    lengths = [len(e.input_ids) for e in examples]
    ids = torch.from_numpy(np.concatenate([np.asarray(e.input_ids, dtype=np.int64) for e in examples]))
    completion = torch.from_numpy(np.concatenate([e.completion for e in examples]).astype(bool))
    completion[np.cumsum([0, *lengths[:-1]])] = False
    labels = torch.where(completion[1:], ids[1:], IGNORE)
    positions = torch.from_numpy(np.concatenate([np.arange(n) for n in lengths]))
    prior = None
    if priors is not None:
        prior = aligned_priors([priors[e.index] for e in examples], lengths, len(ids) - 1, packed=True)
    return Batch(ids[None], None, labels[None], prior, positions[None])


def collate_for(
    cfg: TrainConfig, pad_id: int, priors: dict[int, PriorRecord] | None
) -> Callable[[list[Example]], Batch]:
    """The collation `train.packing` asks for: packed rows, or padded ones."""
    if cfg.packing:
        return lambda examples: collate_packed(examples, priors)
    return lambda examples: collate(examples, pad_id, priors)


def step_batches(examples: list[Example], cfg: TrainConfig) -> list[list[Example]]:
    """Global batches for every step: seeded shuffle per epoch, each batch sorted by length.

    Sorting inside a global batch keeps its set of examples (so any micro-batch split gives the
    same update) while micro-batches of similar lengths need little padding. With
    `group_by_length`, batches are cut from length-sorted mega-batches and then shuffled.
    """
    generator = torch.Generator().manual_seed(cfg.seed)
    batches: list[list[Example]] = []
    while len(batches) < cfg.max_steps:
        order = torch.randperm(len(examples), generator=generator).tolist()
        if cfg.group_by_length:
            mega = 50 * cfg.batch_size
            order = [
                i
                for s in range(0, len(order), mega)
                for i in sorted(order[s : s + mega], key=lambda i: len(examples[i].input_ids))
            ]
        epoch = []
        for start in range(0, len(order) - cfg.batch_size + 1, cfg.batch_size):
            chunk = [examples[i] for i in order[start : start + cfg.batch_size]]
            epoch.append(sorted(chunk, key=lambda e: (len(e.input_ids), e.index)))
        if cfg.group_by_length:
            epoch = [epoch[i] for i in torch.randperm(len(epoch), generator=generator).tolist()]
        batches += epoch
    return batches[: cfg.max_steps]


def micro_batches(global_batch: list[Example], rank: int, world: int, cfg: TrainConfig) -> list[list[Example]]:
    """This process's share of a step (every world-th example), split into micro-batches.

    By `micro_batch_size`, or by the padded-token budget `micro_batch_tokens`: then every process
    computes every share's split and all use the largest count, since FSDP needs the same number of
    forward passes on each process.
    """
    shares = [global_batch[r::world] for r in range(world)]
    if cfg.micro_batch_tokens is None:
        size = cfg.micro_batch_size
        return [shares[rank][i : i + size] for i in range(0, len(shares[rank]), size)]
    count = max(len(_split_by_tokens(share, cfg.micro_batch_tokens, cfg.packing)) for share in shares)
    groups = _split_by_tokens(shares[rank], cfg.micro_batch_tokens, cfg.packing)
    while len(groups) < count:  # halve the costliest group until the counts agree
        i = max(range(len(groups)), key=lambda j: _tokens(groups[j], cfg.packing) if len(groups[j]) > 1 else -1)
        half = len(groups[i]) // 2
        groups[i : i + 1] = [groups[i][:half], groups[i][half:]]
    return groups


def _tokens(group: list[Example], packed: bool) -> int:
    """What a micro-batch costs: its tokens when packed, rows × longest when padded (length-sorted)."""
    return sum(len(e.input_ids) for e in group) if packed else len(group) * len(group[-1].input_ids)


def _split_by_tokens(share: list[Example], budget: int, packed: bool) -> list[list[Example]]:
    """Fewest contiguous groups of a length-sorted share whose cost (`_tokens`) is ≤ budget each."""
    groups: list[list[Example]] = []
    for e in share:
        if groups and _tokens([*groups[-1], e], packed) <= budget:
            groups[-1].append(e)
        else:
            groups.append([e])
    return groups


def batch_shape_problem(tc: TrainConfig, world: int) -> str | None:
    """Why a step's batch cannot be split over `world` processes, or None when it can."""
    if tc.micro_batch_tokens is not None:
        if tc.micro_batch_tokens < 1 or tc.batch_size % world:
            return (
                f"train.micro_batch_tokens={tc.micro_batch_tokens} must be >= 1 and train.batch_size={tc.batch_size} "
                f"a multiple of the {world} processes"
            )
    elif tc.batch_size % (tc.micro_batch_size * world) != 0:
        return (
            f"train.batch_size={tc.batch_size} is not a multiple of micro_batch_size × processes = "
            f"{tc.micro_batch_size} × {world}; change one of them"
        )
    if tc.epochs is None and tc.max_steps * tc.batch_size > MAX_PLANNED:
        return (
            f"train.max_steps={tc.max_steps} × train.batch_size={tc.batch_size} plans more than {MAX_PLANNED:.0e} "
            "example slots, which the step plan holds in memory; use fewer steps (or train.epochs)"
        )
    return None


MAX_PLANNED = 10**8
"""Example slots `step_batches` may plan (~1 GB of references): 400,000 steps of 256, far past any SFT run."""
