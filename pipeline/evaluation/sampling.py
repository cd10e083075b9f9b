"""The hf engine's decode loop: n samples per prompt, each drawn from its own random stream.

Why not `model.generate`: on CPU its key/value cache grows by a copy of the whole cache at every
step (most of the evaluation's time at the demo's size), finished rows keep decoding until the last
row of the batch ends, and one random stream serves the whole batch, so a problem's samples change
with `eval.batch_size` and with its neighbours. Here the cache is a transformers `StaticCache`
grown a block at a time, finished rows leave the batch once they are half of it, and sample j of a
problem with key k draws from a generator seeded with k + j: its tokens do not depend on the batch
it runs in (up to the float rounding of batched matmuls). `benchmarks/generate.py` measures it
against `model.generate`; greedy decoding gives the same tokens (`tests/test_sampling.py`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any

import torch
from transformers import StaticCache
from transformers.cache_utils import StaticLayer

from pipeline.data.tokens import pad_rows

GROW = 16
"""Cache positions added at a time: attention reads the allocated length, not just the filled part."""
BLOCK_VOCAB = 4096
"""Vocabularies up to this size draw GROW steps of noise per generator call (one call per row and
step costs a tenth of the demo's decode time); larger ones draw a step at a time. Either way a row's
stream depends on the model alone, never on the batch."""


def sample_key(seed: int, *names: object) -> int:
    """A stable 62-bit seed for one problem: the same on every machine and in every process."""
    text = "\x1f".join(str(x) for x in (seed, *names))
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little") >> 2


@torch.no_grad()
def sample(
    model: Any,
    prompts: Sequence[Sequence[int]],
    keys: Sequence[int],
    n: int,
    max_new_tokens: int,
    stop_ids: Sequence[int],
    pad: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    greedy: bool = False,
) -> list[list[list[int]]]:
    """n completions per prompt: token ids up to and including the first stop token.

    Args:
        model: A transformers causal LM (its attention layers must support `StaticCache`).
        prompts: Token ids per prompt, unpadded.
        keys: One seed per prompt (`sample_key`); sample j draws from a generator seeded with key + j.
        n: Completions per prompt.
        max_new_tokens: Most tokens per completion.
        stop_ids: Tokens that end a completion (end of sequence, end of turn).
        pad: Any token id: it fills the left padding, which the attention mask hides.
        temperature, top_p: The sampling distribution; ignored when greedy.
        greedy: The most likely token at every step (keys unused).
    """
    device = next(model.parameters()).device
    rows = [list(p) for p in prompts for _ in range(n)]
    generators = [] if greedy else [torch.Generator(device=device).manual_seed(k + j) for k in keys for j in range(n)]
    ids, mask = (t.to(device) for t in pad_rows(rows, pad, left=True))
    growable = _growable(model)
    cache: Any = StaticCache(config=model.config, max_cache_len=ids.shape[1] + (GROW if growable else max_new_tokens))
    positions = (mask.cumsum(1) - 1).clamp(min=0)
    logits = model(input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=cache).logits[:, -1]

    vocab = logits.shape[-1]
    block = GROW if vocab <= BLOCK_VOCAB else 1  # steps of noise per draw
    noise = torch.empty(0)
    live = torch.arange(len(rows), device=device)  # the completion each batch row writes to
    finished = torch.zeros(len(rows), dtype=torch.bool, device=device)
    stops = torch.tensor(list(stop_ids), device=device)
    out: list[list[int]] = [[] for _ in rows]
    for step in range(max_new_tokens):
        if generators and step % block == 0:
            noise = torch.stack(
                [torch.empty(block, vocab, device=device).exponential_(generator=g) for g in generators]
            )
        token = _choose(logits.float(), noise[:, step % block] if generators else None, temperature, top_p)
        for row, t, f in zip(live.tolist(), token.tolist(), finished.tolist(), strict=True):
            if not f:
                out[row].append(t)
        finished |= torch.isin(token, stops)
        if step == max_new_tokens - 1 or bool(finished.all()):
            break
        if 2 * int(finished.sum()) >= len(live):  # drop finished rows once they are half the batch
            keep = (~finished).nonzero().squeeze(1)
            cache.reorder_cache(keep)
            live, token, mask, positions, finished = (x[keep] for x in (live, token, mask, positions, finished))
            if generators:
                generators, noise = [generators[i] for i in keep.tolist()], noise[keep]
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        positions = positions[:, -1:] + 1
        if growable and mask.shape[1] > cache.layers[0].max_cache_len:
            _grow(cache, GROW)
        logits = model(
            input_ids=token[:, None], attention_mask=mask, position_ids=positions, past_key_values=cache
        ).logits[:, -1]
    return [out[i * n : (i + 1) * n] for i in range(len(prompts))]


def _choose(logits: torch.Tensor, noise: torch.Tensor | None, temperature: float, top_p: float) -> torch.Tensor:
    """One token per row: the argmax without noise, else a draw from softmax(logits / temperature) cut to
    the top-p nucleus, by the exponential race: argmax of p / E with E ~ Exp(1) from the row's own
    generator (how `torch.multinomial` draws one sample)."""
    if noise is None:
        return logits.argmax(-1)
    probs = torch.softmax(logits / temperature, dim=-1)
    if top_p < 1.0:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        outside = sorted_p.cumsum(-1) - sorted_p >= top_p  # keeps the token that crosses top_p
        probs = probs.scatter(-1, order, sorted_p.masked_fill(outside, 0.0))
    return (probs / noise).argmax(-1)


def _growable(model: Any) -> bool:
    """Whether every layer gets a plain full-attention `StaticLayer` (sliding-window and linear-attention
    layers keep their own layouts, so their cache is allocated at full length instead)."""
    probe = StaticCache(config=model.config, max_cache_len=1)
    return all(type(layer) is StaticLayer for layer in probe.layers)


def _grow(cache: Any, extra: int) -> None:
    """`extra` more positions in every layer (one copy per GROW steps instead of one per step)."""
    for layer in cache.layers:
        layer.keys = torch.cat([layer.keys, layer.keys.new_zeros(*layer.keys.shape[:2], extra, layer.keys.shape[3])], 2)
        layer.values = torch.cat(
            [layer.values, layer.values.new_zeros(*layer.values.shape[:2], extra, layer.values.shape[3])], 2
        )
        layer.max_cache_len += extra
