"""The hf engine's decode loop (pipeline/evaluation/sampling.py) against transformers' `generate`, and its
per-sample random streams."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, MistralConfig, MistralForCausalLM

from pipeline.evaluation import evaluate, sampling

MAX_NEW = 96


@pytest.fixture(scope="module")
def demo(default_build):
    """The demo's base model (the tiny test build only repeats one token) on 10 held-out prompts."""
    model = AutoModelForCausalLM.from_pretrained(default_build.model).eval()
    tok = AutoTokenizer.from_pretrained(default_build.model)
    rows = [json.loads(line) for line in default_build.sft_heldout.read_text().splitlines()][:10]
    prompts = [evaluate.prompt_ids(tok, r["messages"][0]["content"], None) for r in rows]
    return model, prompts, evaluate.stop_ids(model), tok.pad_token_id


def _reference_greedy(model, prompts, stops, pad):
    """transformers `generate`, one prompt at a time (no padding), cut after the first stop token."""
    out = []
    for p in prompts:
        ids = model.generate(torch.tensor([p]), max_new_tokens=MAX_NEW, do_sample=False, pad_token_id=pad)[0]
        tokens = ids[len(p) :].tolist()
        ends = [i for i, t in enumerate(tokens) if t in stops]
        out.append(tokens[: ends[0] + 1] if ends else tokens)
    return out


def test_greedy_decoding_gives_the_tokens_of_transformers_generate(demo):
    model, prompts, stops, pad = demo
    assert len({len(p) for p in prompts}) > 1  # the batch really is left-padded
    ours = sampling.sample(model, prompts, [0] * len(prompts), 1, MAX_NEW, stops, pad, greedy=True)
    assert [o[0] for o in ours] == _reference_greedy(model, prompts, stops, pad)
    lengths = {len(o[0]) for o in ours}
    assert len(lengths) > 2 and max(lengths) <= MAX_NEW  # rows finished at different steps


def test_a_problems_samples_do_not_depend_on_the_batch_it_runs_in(demo):
    model, prompts, stops, pad = demo
    keys = [sampling.sample_key(7, "set", i) for i in range(len(prompts))]
    args = dict(stop_ids=stops, pad=pad, temperature=0.9)
    together = sampling.sample(model, prompts, keys, 3, MAX_NEW, **args)
    alone = [
        sampling.sample(model, [p], [k], 3, MAX_NEW, **args)[0] for p, k in zip(prompts[:4], keys[:4], strict=True)
    ]
    reordered = sampling.sample(model, prompts[::-1], keys[::-1], 3, MAX_NEW, **args)[::-1]
    assert alone == together[:4] and reordered == together
    assert len({tuple(s) for row in together for s in row}) > len(prompts)  # the samples do differ
    other_seed = sampling.sample(
        model, prompts, [sampling.sample_key(8, "set", i) for i in range(10)], 3, MAX_NEW, **args
    )
    assert other_seed != together
    for row in together:
        for s in row:  # nothing after the first stop token, never longer than asked
            assert len(s) <= MAX_NEW and all(t not in stops for t in s[:-1])


def test_a_tiny_nucleus_is_greedy(demo):
    model, prompts, stops, pad = demo
    greedy = sampling.sample(model, prompts, [0] * len(prompts), 1, MAX_NEW, stops, pad, greedy=True)
    nucleus = sampling.sample(model, prompts, list(range(10)), 2, MAX_NEW, stops, pad, top_p=1e-6)
    assert all(row == [g[0], g[0]] for row, g in zip(nucleus, greedy, strict=True))


def test_the_exponential_race_draws_from_softmax_of_logits_over_temperature():
    logits = torch.tensor([0.0, 1.0, 2.0, -1.0]).repeat(20000, 1)
    noise = torch.empty_like(logits).exponential_(generator=torch.Generator().manual_seed(0))
    drawn = sampling._choose(logits, noise, temperature=0.7, top_p=1.0)
    frequency = torch.bincount(drawn, minlength=4).float() / len(drawn)
    assert torch.allclose(frequency, torch.softmax(logits[0] / 0.7, -1), atol=0.01)
    p = torch.softmax(logits[0] / 0.7, -1)  # 0.044, 0.183, 0.763, 0.010
    cut = sampling._choose(logits, noise, temperature=0.7, top_p=0.9)  # the top two: 0.946
    assert set(cut.tolist()) == {1, 2}
    assert (cut == 1).float().mean().item() == pytest.approx((p[1] / (p[1] + p[2])).item(), abs=0.01)


def test_sliding_window_models_decode_with_a_full_length_cache(demo):
    _, prompts, stops, pad = demo
    torch.manual_seed(0)
    config = MistralConfig(
        vocab_size=512, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, sliding_window=8, max_position_embeddings=256, initializer_range=0.5,
    )  # fmt: skip
    model = MistralForCausalLM(config).eval()  # a wide initialisation: peaked logits, no near-ties
    assert not sampling._growable(model)
    ours = sampling.sample(model, prompts, [0] * len(prompts), 1, MAX_NEW, stops, pad, greedy=True)
    assert [o[0] for o in ours] == _reference_greedy(model, prompts, stops, pad)
