"""Padding-free training (`train.packing`): packed rows give the padded loss and gradients, attention
never crosses documents, and token budgets fill packed rows. CPU, fp32, the tiny model."""

from __future__ import annotations

import random

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from pipeline.core.targets import preset
from pipeline.data import sources
from pipeline.data.config import DataConfig
from pipeline.entry import stages
from pipeline.priors.engines import HFEngine
from pipeline.training import batching, train
from pipeline.training.config import TrainConfig
from tests.test_train import _examples, assert_same_weights, cfg_for, losses


@pytest.fixture(scope="module")
def scored(tiny_build):
    """Eight examples of skewed lengths with their priors from the tiny model itself."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_build.model)
    examples = sources.prepare(DataConfig(max_length=128), tiny_build.sft_train, tokenizer).examples
    examples = sorted(examples, key=lambda e: len(e.input_ids))
    chosen = examples[:6] + examples[-2:]
    records = {r.example_index: r for r in HFEngine(tiny_build.model, k=8).score(chosen)}
    return chosen, records


def _loss_and_grads(model, spec, batch, normaliser):
    model.zero_grad()
    loss, _ = train.TargetLossModel(model, spec, "student_tail", chunk_size=16)(batch, normaliser)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("target", ["sft", "target_sft"])
def test_packed_equals_padded_in_loss_and_gradients(tiny_build, scored, attn, target):
    examples, records = scored
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_build.model, dtype=torch.float32, attn_implementation=attn)
    spec = preset("target_sft", eta=0.5) if target == "target_sft" else preset("sft")
    priors = records if spec.needs_prior else None
    normaliser = float(sum(e.num_scored for e in examples))
    padded = batching.collate(examples, 0, priors)
    packed = batching.collate_packed(examples, priors)
    assert packed.input_ids.shape == (1, sum(len(e.input_ids) for e in examples)) and packed.attention_mask is None
    assert int((packed.labels != -100).sum()) == int((padded.labels != -100).sum())  # same scored tokens
    loss_a, grads_a = _loss_and_grads(model, spec, padded, normaliser)
    loss_b, grads_b = _loss_and_grads(model, spec, packed, normaliser)
    assert abs(float(loss_a - loss_b)) <= 1e-5 * max(1.0, abs(float(loss_a)))
    assert grads_a.keys() == grads_b.keys()
    for name in grads_a:
        assert torch.allclose(grads_a[name], grads_b[name], atol=1e-5, rtol=1e-4), name


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_no_attention_crosses_documents(tiny_build, scored, attn):
    examples, _ = scored
    model = AutoModelForCausalLM.from_pretrained(tiny_build.model, dtype=torch.float32, attn_implementation=attn)
    first, second = examples[0], examples[-1]
    packed = batching.collate_packed([first, second], None)
    n = len(first.input_ids)
    with torch.no_grad():
        logits = model(input_ids=packed.input_ids, position_ids=packed.position_ids, use_cache=False).logits[0]
        perturbed = packed.input_ids.clone()
        perturbed[0, :n] = (perturbed[0, :n] + 7) % model.config.vocab_size  # another first document
        moved = model(input_ids=perturbed, position_ids=packed.position_ids, use_cache=False).logits[0]
        alone = model(input_ids=torch.tensor([second.input_ids.tolist()])).logits[0]
    assert not torch.allclose(logits[:n], moved[:n])  # the perturbation is real...
    assert torch.allclose(logits[n:], moved[n:], atol=1e-6)  # ...and never reaches the second document
    assert torch.allclose(logits[n:], alone, atol=1e-5)  # which reads exactly as it would alone


def test_packed_labels_never_score_a_document_start_from_the_one_before():
    examples = _examples([5, 4, 3])  # every token a completion token
    batch = batching.collate_packed(examples, None)
    assert batch.position_ids.tolist() == [[0, 1, 2, 3, 4, 0, 1, 2, 3, 0, 1, 2]]
    scored = (batch.labels[0] != -100).tolist()
    assert scored == [True] * 4 + [False] + [True] * 3 + [False] + [True] * 2  # positions 4 and 8 predict a start


def test_token_budget_fills_packed_rows():
    rng = random.Random(0)
    batch = sorted(_examples([rng.randint(10, 400) for _ in range(32)]), key=lambda e: len(e.input_ids))
    packed_cfg = TrainConfig(batch_size=32, micro_batch_tokens=800, packing=True)
    padded_cfg = TrainConfig(batch_size=32, micro_batch_tokens=800)
    packed = batching.micro_batches(batch, 0, 1, packed_cfg)
    padded = batching.micro_batches(batch, 0, 1, padded_cfg)
    for group in packed:
        assert len(group) == 1 or sum(len(e.input_ids) for e in group) <= 800
    assert sorted(e.index for g in packed for e in g) == sorted(e.index for e in batch)
    assert len(packed) < len(padded)  # real tokens fill a budget that padding would waste


def test_packed_training_gives_the_padded_update(tiny_build, tmp_path):

    stages.capture_priors(cfg_for(tiny_build, tmp_path), progress=False)
    common = ("train.target={preset: target_sft, eta: 0.5}", "train.batch_size=8", "train.max_steps=3")
    padded = stages.train(cfg_for(tiny_build, tmp_path, *common, "train.name=padded"), progress=False)
    packed_cfg = cfg_for(tiny_build, tmp_path, *common, "train.name=packed", "train.packing=true",
                         "train.micro_batch_tokens=400")  # fmt: skip
    packed = stages.train(packed_cfg, progress=False)
    a, b = losses(padded.parent), losses(packed.parent)
    assert len(a) == 3 and max(abs(x - y) for x, y in zip(a, b, strict=True)) < 1e-5
    assert_same_weights(padded, packed, tol=1e-5)
