"""The prior schema's contract (pipeline/common/prior_schema.py; docs/design.md §4): what every writer's
records must be, and what `cache verify` finds in a stored set that breaks it."""

from __future__ import annotations

import hashlib
import io
import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.common import prior_schema
from pipeline.common.config import load_config
from pipeline.common.errors import PriorError
from pipeline.common.prior_schema import PriorRecord, conform
from pipeline.entry import cli, stages
from pipeline.entry.config import RunConfig
from pipeline.priors.cache import PriorStore
from tests.conftest import REPO
from tests.test_interop import args

V = 100


def record(**change) -> PriorRecord:
    """Three positions, k = 4, a valid prior: observed ranks 1, 3 (inside) and 7 (outside)."""
    lps = np.log(np.array([[0.5, 0.2, 0.1, 0.05], [0.4, 0.3, 0.2, 0.05], [0.6, 0.1, 0.1, 0.1]], np.float32))
    base = PriorRecord(
        example_index=7,
        num_tokens=10,
        positions=np.array([3, 4, 5], np.int32),
        topk_ids=np.array([[1, 2, 3, 4], [5, 6, 7, 8], [9, 10, 11, 12]], np.int32),
        topk_logprobs=lps,
        obs_logprob=np.array([lps[0, 0], lps[1, 2], np.log(0.01)], np.float32),
        obs_rank=np.array([1, 3, 7], np.int32),
    )
    return replace(base, **change)


def test_a_valid_record_passes_unchanged():
    r = record()
    out, clamped = conform(r, V)
    assert clamped == 0 and out is r


def breach(field: str, at: tuple, value) -> PriorRecord:
    r = record()
    array = getattr(r, field).copy()
    array[at] = value
    return replace(r, **{field: array})


@pytest.mark.parametrize(
    "bad, message",
    [
        (breach("topk_ids", (0, 1), V), "outside the prior model's vocabulary"),
        (breach("topk_ids", (0, 1), -1), "outside the prior model's vocabulary"),
        (breach("topk_ids", (1, 1), 5), "appears twice"),
        (breach("topk_logprobs", (0, 1), np.nan), "top-k log-prob nan"),
        (breach("topk_logprobs", (0, 0), np.inf), "top-k log-prob inf"),
        (breach("topk_logprobs", (0, 0), 3.0), "not a log-probability"),
        (breach("topk_logprobs", (0, 3), -0.1), "not sorted"),
        (replace(record(), topk_logprobs=np.full((3, 4), -0.01, np.float32)), "mass"),
        (breach("obs_logprob", (0,), 2.0), "observed log-prob"),
        (breach("obs_logprob", (1,), np.nan), "observed log-prob"),
        (breach("obs_rank", (0,), -2), "observed rank -2"),
        (breach("obs_rank", (0,), 2), "differs from the top-k entry its rank names"),
        (breach("obs_rank", (0,), 0), "without its rank"),
        (breach("obs_logprob", (2,), -0.05), "beyond the top-4"),
        (replace(record(), topk_ids=record().topk_ids.astype(np.float32)), "not integers"),
    ],
    ids=lambda x: x if isinstance(x, str) else "",
)
def test_a_breach_is_one_line_naming_the_example_and_position(bad, message):
    with pytest.raises(PriorError) as e:
        conform(bad, V)
    text = str(e.value)
    assert message in text and "\n" not in text, text
    assert text.startswith("example 7") or "not integers" in text


def test_a_hair_above_zero_is_clamped_and_counted():
    top = np.array([[0.005, -9.0]], np.float32)
    one = PriorRecord(0, 3, np.zeros(1, np.int32), np.array([[4, 5]], np.int32), top, top[:, 0], np.ones(1, np.int32))
    out, clamped = conform(one, V)
    assert clamped == 2 and out.topk_logprobs[0, 0] == 0 and out.obs_logprob[0] == 0
    with pytest.raises(PriorError, match="not a log-probability"):
        conform(replace(one, topk_logprobs=np.array([[0.05, -9.0]], np.float32)), V)
    # a lossy codec's decoded values: any positive value is clamped and counted, mass unbounded
    wild = replace(one, topk_logprobs=np.array([[2.1, 0.3]], np.float32), obs_logprob=np.array([2.1], np.float32))
    out, clamped = conform(wild, V, lossy=True)
    assert clamped == 3 and (out.topk_logprobs == 0).all()


def test_the_encoder_refuses_what_it_would_corrupt():
    codes = prior_schema.encode_logprobs(np.array([-0.1, -0.5, -0.2, -1.0]))
    with pytest.raises(PriorError, match="not sorted"):
        prior_schema.delta_encode(codes, 4)  # a negative delta would wrap to the −inf sentinel
    for bad in (np.nan, 0.5):
        with pytest.raises(PriorError, match="NaN or > 0"):
            prior_schema.encode_logprobs(np.array([bad]))
    ok = prior_schema.encode_logprobs(np.array([-0.1, -0.2, -np.inf, -2000.0]))
    assert ok.tolist() == [6, 13, prior_schema.NEG_INF_CODE, prior_schema.NEG_INF_CODE]


@settings(max_examples=150, deadline=None)
@given(
    st.lists(st.floats(allow_nan=True, allow_infinity=True, width=32), min_size=8, max_size=8),
    st.lists(st.integers(-3, V + 3), min_size=8, max_size=8),
    st.integers(-2, 10),
    st.floats(allow_nan=True, allow_infinity=True, width=32),
)
def test_anything_conform_accepts_encodes_and_decodes_within_the_codes_step(lps, ids, rank, obs):
    """Property: conform either refuses with one line, or returns a record whose stored form decodes to
    its values within half a code step (nothing it accepts is corrupted by the encoder)."""
    r = PriorRecord(
        0, 10, np.array([1, 2], np.int32), np.array(ids, np.int32).reshape(2, 4),
        np.array(lps, np.float32).reshape(2, 4), np.array([obs, -np.inf], np.float32), np.array([rank, 0], np.int32),
    )  # fmt: skip
    try:
        out, _ = conform(r, V)
    except PriorError as e:
        assert "\n" not in str(e)
        return
    codes = prior_schema.delta_encode(prior_schema.encode_logprobs(out.topk_logprobs), 4)
    back = prior_schema.decode_logprobs(prior_schema.delta_decode(codes, 4)).reshape(2, 4)
    finite = back > -1000
    assert np.all(np.abs(back[finite] - out.topk_logprobs[finite]) <= prior_schema.MAX_ABS_ERROR + 1e-6)


def rewrite_shard(root: Path, key: str, change) -> None:
    """Change shard 0's table, then make its checksum and byte count match again (a corruption that
    a checksum cannot see)."""
    store = PriorStore(str(root))
    folder = Path(store.dir(key))
    path = folder / "shards/00000.parquet"
    table = change(pq.read_table(path))
    sink = io.BytesIO()
    pq.write_table(table, sink)
    path.write_bytes(sink.getvalue())
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["shards"][0]["sha256"] = hashlib.sha256(sink.getvalue()).hexdigest()
    manifest["shards"][0]["bytes"] = len(sink.getvalue())
    (folder / "manifest.json").write_text(json.dumps(manifest))


def set_list(table: pa.Table, column: str, change) -> pa.Table:
    values = table.column(column).to_pylist()
    values[0] = change(list(values[0]))
    index = table.schema.get_field_index(column)
    return table.set_column(index, table.schema.field(index), pa.array(values, table.schema.field(index).type))


def wrapped_delta(codes: list[int]) -> list[int]:
    codes[2] = (codes[2] - 40) % 65536  # the negative delta an unsorted writer once stored
    return codes


@pytest.mark.parametrize(
    "column, change, message",
    [
        ("topk_logprob_q", wrapped_delta, "sentinel mid-row"),
        ("topk_ids", lambda ids: [ids[1], *ids[1:]], "appears twice"),
        ("topk_ids", lambda ids: [999_999, *ids[1:]], "vocabulary"),
        ("obs_rank", lambda ranks: [-3, *ranks[1:]], "observed rank -3"),
    ],
    ids=["wrapped-delta", "duplicate-id", "id-beyond-vocab", "negative-rank"],
)
def test_cache_verify_finds_values_that_break_the_contract(tiny_build, tmp_path, capsys, column, change, message):
    captured = stages.capture_priors(load_config(RunConfig, None, args(tiny_build, tmp_path)), progress=False)
    cfg = [f"--set={a}" for a in args(tiny_build, tmp_path)]
    assert cli.main(["cache", "verify", captured.key, *cfg]) == 0
    capsys.readouterr()
    rewrite_shard(tmp_path, captured.key, lambda t: set_list(t, column, change))
    assert cli.main(["cache", "verify", captured.key, *cfg]) == 1
    out = capsys.readouterr().out
    assert message in out and "shards/00000.parquet" in out, out


def test_cache_verify_finds_an_edited_gamma_profile(tiny_build, tmp_path, capsys):
    captured = stages.capture_priors(load_config(RunConfig, None, args(tiny_build, tmp_path)), progress=False)
    path = Path(PriorStore(str(tmp_path)).dir(captured.key)) / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["gamma_profile"].update(mean=0.93, regime="model-strong")
    path.write_text(json.dumps(manifest))
    cfg = [f"--set={a}" for a in args(tiny_build, tmp_path)]
    assert cli.main(["cache", "verify", captured.key, *cfg]) == 1
    assert "gamma_profile disagrees with its shards on mean, regime" in capsys.readouterr().out


# --- property tests of the import formats' columns -----------------------------------------------------
EXAMPLE = __import__("pipeline.data.tokens", fromlist=["Example"]).Example(
    0, np.array([5, 6, 7, 8, 9], np.int32), np.array([False, False, True, True, True])
)
CELL = st.one_of(
    st.none(),
    st.text(max_size=3),
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.lists(st.integers(-5, 2 * V), max_size=6),
    st.lists(st.floats(allow_nan=True, allow_infinity=True), max_size=6),
)


NUMBERS = st.floats(allow_nan=True, allow_infinity=True)
RANK = st.one_of(st.none(), st.integers(-3, 9), st.floats(-3, 9))
IDS = st.one_of(st.integers(-5, 2 * V), st.floats(-5, 2 * V))
POSITION_IDS = st.one_of(st.lists(IDS, min_size=2, max_size=6), CELL)
POSITION_LPS = st.one_of(st.lists(NUMBERS, min_size=2, max_size=6), CELL)


@settings(max_examples=200, deadline=None)
@given(
    ids=st.lists(POSITION_IDS, min_size=5, max_size=5),
    lps=st.lists(POSITION_LPS, min_size=5, max_size=5),
    observed=st.one_of(st.none(), st.lists(st.one_of(st.none(), NUMBERS), min_size=5, max_size=5)),
    ranks=st.one_of(st.none(), st.lists(RANK, min_size=5, max_size=5)),
)
def test_any_axolotl_row_is_one_line_or_a_record_inside_the_contract(ids, lps, observed, ranks):
    """Property (issue: fuzz the boundaries): an Axolotl row of any shape and values either raises one
    PriorError line or yields a record that the schema's contract accepts."""
    from pipeline.priors.interop import axolotl_record

    row = {"target_token_ids": ids, "logprobs": lps, "observed_logprob": observed, "observed_rank": ranks}
    try:
        record = axolotl_record(EXAMPLE, row, 2, V, "target_token_ids", "logprobs")
        conform(record, V)
    except PriorError as e:
        assert "\n" not in str(e) and len(str(e)) < 600, str(e)


@pytest.mark.parametrize(
    "edit, phrase",
    [
        ({"regime": "<script>alert(1)</script>"}, "regime"),
        ({"tokens": -5}, "tokens=-5"),
        ({"mean": "high"}, "mean='high'"),
        ("empty", "tokens=None"),
    ],
    ids=["script-in-regime", "negative-tokens", "text-mean", "empty-profile"],
)
def test_an_edited_gamma_profile_is_one_line_never_printed(tiny_build, tmp_path, capsys, edit, phrase):
    captured = stages.capture_priors(load_config(RunConfig, None, args(tiny_build, tmp_path)), progress=False)
    path = Path(PriorStore(str(tmp_path)).dir(captured.key)) / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["gamma_profile"] = {} if edit == "empty" else {**manifest["gamma_profile"], **edit}
    path.write_text(json.dumps(manifest))
    cfg = [f"--set={a}" for a in args(tiny_build, tmp_path)]
    capsys.readouterr()
    for command in (["cache", "show", captured.key], ["priors", str(REPO / "configs/worlds/model-strong.yaml")]):
        code = cli.main([*command, *cfg])
        out, err = capsys.readouterr()
        assert code == 2 and phrase in err and err.count("\n") == 1, (command, err)
        assert "<script>" not in out + err
    assert cli.main(["cache", "verify", captured.key, *cfg]) == 1
    capsys.readouterr()


@settings(max_examples=150, deadline=None)
@given(
    data=st.one_of(st.binary(min_size=14, max_size=14), st.binary(max_size=40)),  # 14: bf16 head + 3 float32 terms
    ids=st.one_of(st.binary(min_size=4, max_size=4), st.binary(max_size=60)),  # 4: four 7-bit ids
    n=st.integers(1, 3),
)
def test_any_distillkit_bytes_are_one_line_or_a_record_inside_the_contract(data, ids, n):
    """Property: whatever bytes a DistillKit row holds per position, the import decodes them into a
    record the contract accepts (lossy: clamped and counted) or says in one line why it cannot."""
    from pipeline.priors.interop import DistillKitCodec, distillkit_record

    codec = DistillKitCodec(
        d=V, k=4, exact_k=1, exact_dtype="bfloat16", polynomial_terms=[0, 1, "sqrt"], term_dtype="float32",
        residual_bins=[], delta_encoding=False, normalize_t=False,
    )  # fmt: skip
    table = pa.table(
        {
            "compressed_logprobs": [[list(data)] * 5],
            "bytepacked_indices": [[list(ids)] * 5],
        }
    )
    example = __import__("pipeline.data.tokens", fromlist=["Example"]).Example(
        0, np.arange(5, dtype=np.int32), np.array([False, False] + [True] * 3)
    )
    try:
        record = distillkit_record(example, table, 0, codec, min(n, 4), V, "data_0.parquet")
        conform(record, V, lossy=True)
    except PriorError as e:
        assert "\n" not in str(e) and len(str(e)) < 600, str(e)
