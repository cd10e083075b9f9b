"""The γ profile of a prior set and its regime (pipeline/priors/regimes.py, docs/design.md §10)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from pipeline.common import prior_schema
from pipeline.common.errors import CacheError
from pipeline.entry import cli, stages
from pipeline.priors import regimes
from pipeline.priors.cache import PriorStore
from tests.conftest import REPO
from tests.test_priors import cfg_args, make_cfg

KEYS = {"tokens", "mean", "share_above_0_55", "share_below_0_01", "q05", "q10", "q20", "q50", "regime", "captured_by"}


def test_profile_from_codes_matches_numpy_on_the_decoded_values():
    """Mean, shares and inverted-CDF quantiles of the stored γ, from the code histogram alone."""
    rng = np.random.default_rng(0)
    gamma = np.concatenate([rng.beta(0.3, 0.2, 20_000), np.zeros(50)])  # a real-looking U shape, some -inf
    codes = prior_schema.encode_logprobs(np.log(np.maximum(gamma, 1e-300)))
    codes[-50:] = prior_schema.NEG_INF_CODE
    stored = np.exp(prior_schema.decode_logprobs(codes).astype(np.float64))
    p = regimes.profile(regimes.code_histogram([codes[:7000], codes[7000:]]))
    assert p["tokens"] == codes.size
    assert p["mean"] == pytest.approx(stored.mean(), abs=1e-12)
    assert p["share_above_0_55"] == pytest.approx((stored > 0.55).mean(), abs=1e-12)
    assert p["share_below_0_01"] == pytest.approx((stored < 0.01).mean(), abs=1e-12)
    for name, q in (("q05", 0.05), ("q10", 0.10), ("q20", 0.20), ("q50", 0.50)):
        assert p[name] == pytest.approx(np.quantile(stored, q, method="inverted_cdf"), abs=1e-12)


@pytest.mark.parametrize(
    "mean,regime",
    [(0.0, "model-weak"), (0.19, "model-weak"), (0.30, "model-intermediate"), (0.55, "model-intermediate"),
     (0.70, "model-strong"), (0.80, "model-strong"), (1.0, "model-strong")],
)  # fmt: skip
def test_bands_cover_the_line_once(mean, regime):
    assert regimes.band(mean).name == regime


def test_no_scored_tokens_is_one_clear_error():
    with pytest.raises(CacheError, match="has no scored tokens, so it has no γ profile"):
        regimes.profile(regimes.code_histogram([]))


def test_stored_profile_agrees_with_a_fresh_full_vocabulary_forward(tiny_build, tmp_path):
    """The manifest's mean γ against p(observed) from the model's full softmax, over the same tokens."""
    cfg = make_cfg(tiny_build, tmp_path)
    result = stages.capture_priors(cfg, progress=False)
    profile = PriorStore(str(tmp_path)).manifest(result.key)["gamma_profile"]
    assert set(profile) >= KEYS and profile["captured_by"] == "model"
    model = AutoModelForCausalLM.from_pretrained(tiny_build.model, dtype=torch.float32).eval()
    fresh = []
    for example in stages.plan_priors(cfg, progress=False).prepared.examples:
        ids = torch.tensor([example.input_ids.tolist()])
        with torch.no_grad():
            logp = torch.log_softmax(model(ids).logits[0].double(), -1)
        scored = [t for t in range(len(ids[0]) - 1) if example.labels[t + 1] != -100]
        fresh += logp[scored, ids[0, 1:][scored]].exp().tolist()
    assert profile["tokens"] == len(fresh)
    assert abs(profile["mean"] - float(np.mean(fresh))) < 1e-3
    assert abs(profile["share_above_0_55"] - float(np.mean(np.array(fresh) > 0.55))) < 0.01


def test_priors_prints_the_profile_and_records_it(tiny_build, tmp_path, capsys):
    args = [
        "priors",
        str(REPO / "configs" / "worlds" / "model-strong.yaml"),
        *[f"--set={a}" for a in cfg_args(tiny_build, tmp_path)],
    ]
    assert cli.main(args) == 0
    out = capsys.readouterr().out
    assert "γ profile (p(observed) under the model being trained" in out and "\nregime: model-" in out
    (key,) = PriorStore(str(tmp_path)).list_keys()
    manifest = json.loads((tmp_path / "priors" / key / "manifest.json").read_text())
    assert set(manifest["gamma_profile"]) >= KEYS
    assert f"mean {manifest['gamma_profile']['mean']:.3f}" in out


def test_a_teacher_prior_is_labelled_as_the_teachers(tiny_build, tmp_path, capsys):
    """The profile describes the model that captured it: with a teacher, training's γ is the student's."""
    args = [
        "priors",
        str(REPO / "configs" / "worlds" / "model-strong.yaml"),
        *[f"--set={a}" for a in cfg_args(tiny_build, tmp_path)],
    ]
    teacher = tmp_path / "teacher"  # a copy of the model, in its own folder: another model to the pipeline
    shutil.copytree(tiny_build.model, teacher)
    assert cli.main([*args, f"--set=priors.model_path={teacher}"]) == 0
    out = capsys.readouterr().out
    assert "under a teacher, not the model being trained: training's γ is the student's own p" in out
    (key,) = PriorStore(str(tmp_path)).list_keys()
    assert PriorStore(str(tmp_path)).manifest(key)["gamma_profile"]["captured_by"] == "teacher"


def test_cache_show_computes_the_profile_of_a_set_captured_before_profiles(tiny_build, tmp_path, capsys):
    result = stages.capture_priors(make_cfg(tiny_build, tmp_path), progress=False)
    path = tmp_path / "priors" / result.key / "manifest.json"
    manifest = json.loads(path.read_text())
    recorded = manifest.pop("gamma_profile")
    manifest["capture"].pop("prior_role")
    path.write_text(json.dumps(manifest))  # what a capture before this change left
    assert cli.main(["cache", "show", result.key, f"--set=storage_root={tmp_path}"]) == 0
    out = capsys.readouterr().out
    assert "under the prior model (captured before the role was recorded)" in out
    written = json.loads(path.read_text())["gamma_profile"]  # and written back
    assert {k: v for k, v in written.items() if k != "captured_by"} == {
        k: v for k, v in recorded.items() if k != "captured_by"
    }
    assert written["captured_by"] == "unknown"
    assert PriorStore(str(tmp_path)).verify(result.key) == []  # the rewritten manifest still checks out


def test_cache_show_of_a_set_with_no_scored_tokens_is_one_line(tmp_path, capsys):
    folder = tmp_path / "priors" / ("f" * 20)
    folder.mkdir(parents=True)
    manifest = {"key_inputs": {"k": 4}, "engine": "hf", "statistics": {}, "shards": []}
    manifest["counts"] = {"shards": 0, "examples": 0, "scored_tokens": 0}
    (folder / "manifest.json").write_text(json.dumps(manifest))
    (folder / "_SUCCESS").write_text("")
    assert cli.main(["cache", "show", "f" * 20, f"--set=storage_root={tmp_path}"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "has no scored tokens, so it has no γ profile" in err
