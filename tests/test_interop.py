"""`cache import` / `cache export`: Axolotl KD datasets to and from prior sets.

The fixtures follow Axolotl's documented layout (axolotl-ai-cloud/axolotl,
src/axolotl/integrations/kd/README.md "Target alignment", and chat_template.py's
`ChatTemplateStrategyWithKDv2`, the dataset type `axolotl.integrations.kd.chat_template`): per row a
chat under `messages`, and per input token j `target_token_ids[j]` and `logprobs[j]`, the teacher's
top-k over input_ids[j + 1]; the last row is padding (large negative log-probs).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from pipeline.common.config import load_config
from pipeline.entry import cli, stages
from pipeline.entry.config import RunConfig
from pipeline.priors.cache import PriorStore
from pipeline.priors.interop import unpack_bits
from tests.conftest import REPO, tiny_args

K = 8
# the tiny model's chat template with a line in front: every row tokenises one token longer or more
OTHER_TEMPLATE = (
    '"Note:\\n{% for m in messages %}<|{{ m.role }}|>\\n{{ m.content }}<|end|>\\n{% endfor %}'
    '{% if add_generation_prompt %}<|assistant|>\\n{% endif %}"'
)


def args(build, root: Path, *extra: str) -> list[str]:
    return tiny_args(build, root, f"priors.k={K}", "priors.shard_size=16", *extra)


def run(argv: list[str], capsys) -> tuple[int, str, str]:
    code = cli.main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def errors(err: str) -> int:
    """Lines of error output, progress bars aside."""
    bars = ("it/s]", "ex/s]", "row/s]")
    return sum(1 for line in err.splitlines() if line.strip() and not any(bar in line for bar in bars))


def sets(root: Path) -> list[str]:
    """The prior sets under a root (complete or not)."""
    return sorted(p.name for p in (root / "priors").iterdir() if p.is_dir()) if (root / "priors").exists() else []


def write_axolotl_kd(build, root: Path, path: Path, k: int = K, extra: tuple[str, ...] = ()) -> Path:
    """An Axolotl KD dataset of the tiny SFT set, as a vLLM prompt-logprobs producer writes it: the
    model's top-k at every position, one row per input token, the last one padding."""
    cfg = load_config(RunConfig, None, args(build, root, *extra))
    examples = stages.plan_priors(cfg, progress=False).prepared.examples
    source = [json.loads(line) for line in Path(build.sft_train).read_text().splitlines()]
    model = AutoModelForCausalLM.from_pretrained(build.model).eval()
    rows = []
    with torch.no_grad():
        for example in examples:
            ids = torch.as_tensor(example.input_ids, dtype=torch.long)[None]
            values, indices = model(ids).logits[0].log_softmax(-1).topk(k, dim=-1)
            top_ids, top_lps = indices.tolist(), values.tolist()
            top_ids[-1], top_lps[-1] = [0] * k, [-1e9] * k  # the last row describes no token: padding
            rows.append(
                {"messages": source[example.index]["messages"], "target_token_ids": top_ids, "logprobs": top_lps}
            )
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def records(root: Path, key: str) -> dict:
    return PriorStore(str(root)).open(key).load_all()


def test_an_axolotl_kd_dataset_imports_as_a_prior_set_and_trains(tiny_build, tmp_path, capsys):
    fixture = write_axolotl_kd(tiny_build, tmp_path / "fixture", tmp_path / "kd.jsonl")
    argv = ["cache", "import", str(fixture), *[f"--set={a}" for a in args(tiny_build, tmp_path)]]
    code, out, err = run(argv, capsys)
    assert code == 0, err
    key = out.split("prior set ")[1].split(":")[0]
    assert "imported 60 examples" in out and f"train.prior_key={key}" in out and "γ profile" in out
    manifest = PriorStore(str(tmp_path)).manifest(key)
    assert manifest["capture"]["engine"] == "import" and manifest["key_inputs"]["engine"]["format"] == "axolotl"
    # the same numbers as this pipeline's own capture at the same positions
    captured = stages.capture_priors(load_config(RunConfig, None, args(tiny_build, tmp_path / "own")), progress=False)
    mine, theirs = records(tmp_path / "own", captured.key), records(tmp_path, key)
    assert mine.keys() == theirs.keys()
    inside = outside = 0
    for index in mine:
        a, b = mine[index], theirs[index]
        np.testing.assert_array_equal(a.positions, b.positions)
        np.testing.assert_array_equal(a.topk_ids, b.topk_ids)
        np.testing.assert_allclose(a.topk_logprobs, b.topk_logprobs, atol=1 / 64 + 1e-5)
        known = a.obs_rank <= K  # the format stores the observed token only where it is in the top-k
        np.testing.assert_allclose(a.obs_logprob[known], b.obs_logprob[known], atol=1 / 64 + 1e-5)
        np.testing.assert_array_equal(a.obs_rank[known], b.obs_rank[known])
        assert np.all(np.isneginf(b.obs_logprob[~known])) and np.all(b.obs_rank[~known] == 0)
        inside, outside = inside + known.sum(), outside + (~known).sum()
    assert inside > 0 and outside > 0  # both cases occurred
    # a second import reuses the set
    code, out, _ = run(argv, capsys)
    assert code == 0 and "reused" in out
    # and Target-SFT trains on it
    train = [f"--set={a}" for a in args(tiny_build, tmp_path)]
    train += ["--set=train.target={preset: target_sft, eta: 0.5}", f"--set=train.prior_key={key}"]
    train += [
        "--set=train.max_steps=2",
        "--set=train.batch_size=4",
        "--set=train.micro_batch_size=4",
        "--set=train.eval_every=0",
        "--set=train.name=imp",
    ]
    code, out, err = run(["train", str(REPO / "configs/worlds/model-strong.yaml"), *train], capsys)
    assert code == 0, err
    losses = [json.loads(line)["loss"] for line in (tmp_path / "runs/imp/metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 2 and all(np.isfinite(losses))
    assert json.loads((tmp_path / "runs/imp/run.json").read_text())["prior_key"] == key


def test_export_then_import_gives_the_same_priors(tiny_build, tmp_path, capsys):
    captured = stages.capture_priors(load_config(RunConfig, None, args(tiny_build, tmp_path)), progress=False)
    cfg_args = [f"--set={a}" for a in args(tiny_build, tmp_path)]
    code, out, err = run(["cache", "export", captured.key, "--out", str(tmp_path / "kd"), *cfg_args], capsys)
    assert code == 0 and (tmp_path / "kd" / "train.parquet").exists(), err
    code, _, err = run(["cache", "export", captured.key, "--out", str(tmp_path / "kd"), *cfg_args], capsys)
    assert (code, errors(err), "exists" in err) == (2, 1, True), err  # never over an earlier export
    code, out, err = run(["cache", "import", str(tmp_path / "kd"), *cfg_args], capsys)
    assert code == 0, err
    key = out.split("prior set ")[1].split(":")[0]
    assert key != captured.key  # an import is keyed by its source files
    a, b = records(tmp_path, captured.key), records(tmp_path, key)
    assert a.keys() == b.keys()
    for index in a:  # exported values are the codec's, so they encode to the same codes: identical
        for field in ("positions", "topk_ids", "topk_logprobs", "obs_logprob", "obs_rank"):
            np.testing.assert_array_equal(getattr(a[index], field), getattr(b[index], field), err_msg=field)


def mutate(fixture: Path, out: Path, change) -> Path:
    rows = [json.loads(line) for line in fixture.read_text().splitlines()]
    change(rows)
    out.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return out


def drop_first_position(rows):
    rows[3]["target_token_ids"], rows[3]["logprobs"] = rows[3]["target_token_ids"][1:], rows[3]["logprobs"][1:]


def foreign_ids(rows):
    for row in rows:
        row["input_ids"] = [0] * len(row["target_token_ids"])


def short_k(rows):
    rows[1]["target_token_ids"][-2], rows[1]["logprobs"][-2] = [5, 6], [-0.1, -2.0]


def big_id(rows):
    rows[0]["target_token_ids"][-2][0] = 10**6


def swap_equal_lengths(rows):
    """Two rows of the same token count swapped: counts alone cannot see it, their messages do."""
    by_length: dict[int, int] = {}
    for i, row in enumerate(rows):
        j = by_length.setdefault(len(row["target_token_ids"]), i)
        if j != i:
            rows[i], rows[j] = rows[j], rows[i]
            return


def at_every_scored_row(change_one):
    """Apply `change_one(ids, logprobs)` to the second-to-last row of every example (a scored position)."""

    def change(rows):
        for row in rows:
            change_one(row["target_token_ids"][-2], row["logprobs"][-2])

    return change


def observed_columns(logprob, rank):
    def change(rows):
        for row in rows:
            n = len(row["target_token_ids"])
            row["observed_logprob"] = [logprob] * n
            row["observed_rank"] = [rank] * n

    return change


def wrong_values(value):
    def change(rows):
        for row in rows:
            row["logprobs"] = [[value] * len(v) for v in row["logprobs"]]

    return change


@pytest.mark.parametrize(
    ("change", "extra", "message"),
    [
        (drop_first_position, (), "row 3: the source has"),
        (lambda rows: rows.pop(), (), "has 59 rows, the data 60"),
        (foreign_ids, (), "row 0, position 0: the source's input_ids differ"),
        (short_k, (), "fewer than priors.k=8"),
        (big_id, (), "outside the prior model's vocabulary"),
        (lambda rows: [r.pop("logprobs") for r in rows], (), "has no column logprobs"),
        (lambda rows: None, (f"data.chat_template={OTHER_TEMPLATE}",), "row 0: the source has"),
        (swap_equal_lengths, (), "messages differ from the data's row"),
        (lambda rows: [r.pop("messages") for r in rows], (), "neither input_ids nor messages"),
        (wrong_values(3.0), (), "> 0, not a log-probability"),
        (wrong_values(-0.01), (), "probability mass"),
        (wrong_values(-1e9), (), "no finite log-prob"),
        (wrong_values(float("nan")), (), "top-k log-prob nan"),
        (wrong_values(float("inf")), (), "top-k log-prob inf"),
        (at_every_scored_row(lambda ids, lps: ids.__setitem__(1, ids[0])), (), "appears twice"),
        (at_every_scored_row(lambda ids, lps: ids.__setitem__(0, ids[0] + 0.7)), (), "not whole numbers"),
        (at_every_scored_row(lambda ids, lps: ids.__setitem__(0, "x")), (), "not numbers"),
        (at_every_scored_row(lambda ids, lps: lps.__setitem__(0, None)), (), "top-k log-prob nan"),
        (observed_columns(2.0, 1), (), "observed log-prob +2"),
        (observed_columns(-0.5, -3), (), "observed rank -3"),
    ],
    ids=[
        "shorter-row",
        "fewer-rows",
        "other-ids",
        "smaller-k",
        "other-vocabulary",
        "no-logprobs",
        "other-template",
        "permuted-rows",
        "no-content",
        "positive-logprobs",
        "mass-7.9",
        "all-padding",
        "nan",
        "inf",
        "duplicate-ids",
        "fractional-id",
        "string-id",
        "null-logprob",
        "observed-plus-2",
        "negative-rank",
    ],
)
def test_a_misaligned_import_is_one_line_and_writes_nothing(tiny_build, tmp_path, capsys, change, extra, message):
    fixture = write_axolotl_kd(tiny_build, tmp_path / "fixture", tmp_path / "kd.jsonl")
    source = mutate(fixture, tmp_path / "bad.jsonl", change)
    argv = ["cache", "import", str(source), *[f"--set={a}" for a in args(tiny_build, tmp_path / "root", *extra)]]
    code, _, err = run(argv, capsys)
    assert (code, errors(err), message in err) == (2, 1, True), err
    assert "Traceback" not in err and sets(tmp_path / "root") == []


# --- DistillKit -------------------------------------------------------------------------------------------
# The capture layout of arcee-ai/DistillKit: `distillkit/sample_logits_vllm.py` (rows shuffled, one pad
# token appended, prompt logprobs without the first position), `distillkit/sample_common.py`
# (`compressed_logit_schema`, `data_N.parquet`), and the codec of
# `distillkit/compression/monotonic_logprobs.py` (`compress_monotonic_logprobs`) and
# `distillkit/compression/bitpack.py` (`pack_to_bytes`, most significant bit first), written here in
# numpy as those functions compute it (DistillKit is not on PyPI and pins TRL 0.25).

# --- DistillKit ------------------------------------------------------------------------------------------
# The fixtures follow arcee-ai/DistillKit at commit a61c2e7d (not on any registry, so its code cannot be
# installed here): `compress` and `decompress` below are line-for-line ports, in torch, of
# `distillkit/compression/monotonic_logprobs.py` (compress_monotonic_logprobs with its SVD least squares,
# decompress_monotonic_logprobs) and `bitpack.py`, for configs without residual bins, as the README's three
# are. `decompress` is the reference the import is held to: an independent port of the decoder beside
# pipeline/priors/interop.py's numpy one.
D = 416  # the tiny tokenizer's vocabulary: DistillKit's capture sets d to it (auto_vocab_size)
README_CONFIGS = {
    "recommended": {  # "Recommended configuration (used at Arcee for new captures)"
        "d": D, "k": 128, "exact_k": 16, "exact_dtype": "bfloat16", "polynomial_terms": [0, 1, 2, 3, 4, "sqrt"],
        "term_dtype": "float32", "residual_bins": [], "delta_encoding": False, "error_diffusion": False,
    },
    "budget": {  # "budget pick"
        "d": D, "k": 50, "exact_k": 1, "exact_dtype": "bfloat16", "polynomial_terms": [0, 1, "sqrt"],
        "term_dtype": "float32", "residual_bins": [], "delta_encoding": False, "error_diffusion": False,
    },
    "quickstart": {  # the Quick Start's teacher.logprob_compressor
        "d": D, "delta_encoding": True, "error_diffusion": False, "exact_dtype": "float32", "exact_k": 32, "k": 128,
        "polynomial_terms": [0, 1, 2], "residual_bins": [], "term_dtype": "float32",
    },
}  # fmt: skip
TORCH_DTYPES = {
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float32": torch.float32,
    "float64": torch.float64,
}


def _terms(terms: list, t: int, dtype: torch.dtype) -> torch.Tensor:
    """`polynomial_terms` (normalize_t false)."""
    pts = torch.arange(t, dtype=dtype)
    return torch.stack([pts**i if isinstance(i, int) else getattr(torch, i)(pts) for i in terms], dim=-1)


def compress(logprobs: torch.Tensor, codec: dict) -> torch.Tensor:
    """`compress_monotonic_logprobs` ([n, k] float32, sorted descending → [n, B] uint8), no residual bins."""
    if codec["delta_encoding"]:
        deltas = logprobs[..., 1:] - logprobs[..., :-1]
        logprobs = torch.cat([logprobs[..., :1], deltas], dim=-1).to(logprobs.dtype)
    chunks = []
    exact_k = codec["exact_k"]
    if exact_k > 0:
        exact = logprobs[..., :exact_k].to(TORCH_DTYPES[codec["exact_dtype"]])
        chunks.append(exact.view(torch.uint8).reshape(*logprobs.shape[:-1], -1))
    values = logprobs[..., exact_k : codec["k"]]
    X = _terms(codec["polynomial_terms"], values.shape[-1], torch.float32).unsqueeze(0)  # fit_polynomial
    U, S, Vh = torch.linalg.svd(X, full_matrices=False)  # _solve_least_squares
    Spinv = torch.zeros_like(S)
    Spinv[S > 1e-5] = 1 / S[S > 1e-5]
    coeffs = (Vh.transpose(-1, -2) @ (Spinv.unsqueeze(-1) * (U.transpose(-1, -2) @ values.unsqueeze(-1)))).squeeze(-1)
    coeffs = coeffs.to(TORCH_DTYPES[codec["term_dtype"]])
    chunks.append(coeffs.view(torch.uint8).reshape(*logprobs.shape[:-1], -1))
    return torch.cat(chunks, dim=-1)


def decompress(data: torch.Tensor, codec: dict) -> torch.Tensor:
    """`decompress_monotonic_logprobs(bytes, config)` with its default out_dtype (the exact dtype)."""
    out_dtype = TORCH_DTYPES[codec["exact_dtype"]]
    width = 2 if codec["exact_dtype"] in ("float16", "bfloat16") else torch.finfo(out_dtype).bits // 8
    exact_bytes = codec["exact_k"] * width
    exact = data[..., :exact_bytes].contiguous().view(out_dtype).reshape(*data.shape[:-1], codec["exact_k"])
    rest = data[..., exact_bytes:].clone()
    term_dtype = TORCH_DTYPES[codec["term_dtype"]]
    count = len(codec["polynomial_terms"])
    coeffs = rest[..., : count * (torch.finfo(term_dtype).bits // 8)].contiguous().view(term_dtype)
    coeffs = coeffs.reshape(*rest.shape[:-1], count)
    approx_terms = codec["k"] - codec["exact_k"]
    residual = torch.zeros((*rest.shape[:-1], approx_terms), dtype=out_dtype)
    X = _terms(codec["polynomial_terms"], approx_terms, term_dtype)
    approx = torch.sum(X * coeffs.unsqueeze(-2), dim=-1) + residual.to(out_dtype)
    logprobs = torch.cat([exact.to(out_dtype), approx], dim=-1)
    if codec["delta_encoding"]:
        logprobs = torch.cumsum(logprobs.float(), dim=-1).to(out_dtype)
    return logprobs


def pack_bits(values: np.ndarray, bits: int) -> np.ndarray:
    """`pack_to_bytes`: each value's `bits` bits, most significant first, padded to whole bytes."""
    stream = ((values[..., None].astype(np.int64) >> np.arange(bits - 1, -1, -1)) & 1).astype(np.uint8)
    return np.packbits(stream.reshape(len(values), -1), axis=-1)


def write_distillkit(
    build, root: Path, folder: Path, codec: dict, rows_per_file: int = 25, cliffs: bool = False
) -> Path:
    """What `sample_logits_vllm.py` leaves for the tiny SFT set: shuffled rows, a pad token appended, and
    per position the model's top-k through `LogprobCompressor.compress_from_sparse` (sorted, compressed,
    ids bit-packed). `cliffs`: at every third position the mass is shared by 20 tokens and the rest lie
    25 nats below, a shape the curve fit overshoots to positive values (the tiny model's own curves
    never decode above 0)."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import yaml

    cfg = load_config(RunConfig, None, args(build, root))
    examples = stages.plan_priors(cfg, progress=False).prepared.examples
    model = AutoModelForCausalLM.from_pretrained(build.model).eval()
    pad = model.config.pad_token_id
    bits = int(np.ceil(np.log2(codec["d"])))
    rows = []
    with torch.no_grad():
        for example in examples:
            ids = [*example.input_ids.tolist(), pad]
            values, indices = model(torch.tensor([ids])).logits[0, :-1].log_softmax(-1).topk(codec["k"], dim=-1)
            if cliffs:
                cliff = torch.full((codec["k"],), -25.0)
                cliff[:20] = -math.log(20)
                values[::3] = cliff - torch.arange(codec["k"]) * 1e-3
            rows.append(
                {
                    "input_ids": ids,
                    "compressed_logprobs": compress(values, codec).tolist(),
                    "bytepacked_indices": pack_bits(indices.numpy(), bits).tolist(),
                }
            )
    order = np.random.default_rng(0).permutation(len(rows))
    schema = pa.schema(
        [
            pa.field("input_ids", pa.list_(pa.uint64())),
            pa.field("compressed_logprobs", pa.list_(pa.list_(pa.uint8()))),
            pa.field("bytepacked_indices", pa.list_(pa.list_(pa.uint8()))),
        ]
    )
    folder.mkdir(parents=True)
    for n, start in enumerate(range(0, len(rows), rows_per_file)):
        part = [rows[i] for i in order[start : start + rows_per_file]]
        pq.write_table(pa.Table.from_pylist(part, schema=schema), folder / f"data_{n}.parquet")
    (folder / "compression_config.yaml").write_text(yaml.safe_dump(codec))
    return folder


@pytest.mark.parametrize("name", [*README_CONFIGS, "recommended+cliffs"])
def test_a_distillkit_capture_imports_what_its_decoder_gives(tiny_build, tmp_path, capsys, name):
    """Stored log-probs are DistillKit's decoded ones, sorted most likely first and clamped to ≤ 0
    (the clamp counted in the manifest): none lost to the −inf sentinel, as unsorted rows once were."""
    codec = README_CONFIGS[name.split("+")[0]]
    source = write_distillkit(tiny_build, tmp_path / "fixture", tmp_path / "dk", codec, cliffs="cliffs" in name)
    argv = ["cache", "import", str(source), "--format", "distillkit"]
    code, out, err = run([*argv, *[f"--set={a}" for a in args(tiny_build, tmp_path)]], capsys)
    assert code == 0, err
    key = out.split("prior set ")[1].split(":")[0]
    store = PriorStore(str(tmp_path))
    manifest = store.manifest(key)
    assert manifest["key_inputs"]["engine"]["format"] == "distillkit" and store.verify(key) == []
    stored = records(tmp_path, key)
    examples = stages.plan_priors(
        load_config(RunConfig, None, args(tiny_build, tmp_path)), progress=False
    ).prepared.examples
    import pyarrow.parquet as pq

    by_ids = {}
    for f in sorted(source.glob("*.parquet")):
        for row in pq.read_table(f).to_pylist():
            by_ids[tuple(row["input_ids"][:-1])] = row
    clamped = rising = 0
    for example in examples:
        row, record = by_ids[tuple(example.input_ids.tolist())], stored[example.index]
        t = record.positions
        decoded = decompress(torch.tensor([row["compressed_logprobs"][i] for i in t], dtype=torch.uint8), codec)
        decoded = decoded.float().numpy()
        rising += int((np.diff(decoded, axis=1) > 0).any(axis=1).sum())
        ids = unpack_bits(np.asarray([row["bytepacked_indices"][i] for i in t], np.uint8), 9, codec["k"])  # 2⁹ ≥ D
        order = np.argsort(-decoded, axis=1, kind="stable")
        want_lp, want_ids = np.take_along_axis(decoded, order, 1), np.take_along_axis(ids, order, 1)
        np.testing.assert_array_equal(record.topk_ids, want_ids[:, :K])
        np.testing.assert_allclose(record.topk_logprobs, np.minimum(want_lp[:, :K], 0), atol=1 / 128 + 1e-6)
        assert np.isfinite(record.topk_logprobs).all()  # no entry lost to the sentinel
        hit = want_ids == example.input_ids[t + 1][:, None]
        rank = np.where(hit.any(1), hit.argmax(1) + 1, 0)
        np.testing.assert_array_equal(record.obs_rank, rank)
        obs = np.where(rank > 0, want_lp[np.arange(len(t)), np.maximum(rank - 1, 0)], -np.inf)
        clamped += int((want_lp[:, :K] > 0).sum() + (obs > 0).sum())
    assert manifest["counts"]["clamped_logprobs"] == clamped
    assert (f"{clamped:,} log-probs above 0" in out) == (clamped > 0)
    if name != "budget" and name != "quickstart":  # (the tiny model's curves fit those without a rise)
        assert rising > 0  # the decoded curves really rise: the case that was lost to the sentinel before
    assert (clamped > 0) == (name == "recommended+cliffs")
    # Target-SFT trains on it
    train = [*[f"--set={a}" for a in args(tiny_build, tmp_path)], "--set=train.target={preset: target_sft, eta: 0.5}"]
    train += [f"--set=train.prior_key={key}", "--set=train.max_steps=2", "--set=train.batch_size=4"]
    train += ["--set=train.micro_batch_size=4", "--set=train.eval_every=0", "--set=train.name=dk"]
    code, _, err = run(["train", str(REPO / "configs/worlds/model-strong.yaml"), *train], capsys)
    assert code == 0, err


@pytest.mark.parametrize("fmt", ["axolotl", "distillkit"])
def test_a_missing_source_is_one_line(tiny_build, tmp_path, capsys, fmt):
    argv = ["cache", "import", str(tmp_path / "nowhere"), "--format", fmt]
    code, _, err = run([*argv, *[f"--set={a}" for a in args(tiny_build, tmp_path)]], capsys)
    assert (code, errors(err), "nowhere" in err, "data.path" not in err) == (2, 1, True, True), err


def test_a_distillkit_capture_of_other_rows_or_a_damaged_one_is_one_line(tiny_build, tmp_path, capsys):
    import pyarrow as pa
    import pyarrow.parquet as pq

    source = write_distillkit(tiny_build, tmp_path / "fixture", tmp_path / "dk", README_CONFIGS["budget"])
    root = tmp_path / "root"

    def attempt(*extra: str, folder: Path = source) -> str:
        argv = ["cache", "import", str(folder), "--format", "distillkit"]
        code, _, err = run([*argv, *[f"--set={a}" for a in args(tiny_build, root, *extra)]], capsys)
        assert (code, errors(err)) == (2, 1), err
        assert sets(root) == []
        return err

    assert "row 0: no row of the DistillKit capture" in attempt(f"data.chat_template={OTHER_TEMPLATE}")
    assert "fewer than priors.k=51" in attempt("priors.k=51")
    # one shard's byte rows cut short: the codec no longer fits
    table = pq.read_table(source / "data_0.parquet")
    shorter = [[r[:-1] for r in row] for row in table.column(1).to_pylist()]
    cut = table.set_column(1, "compressed_logprobs", pa.array(shorter, type=table.schema.field(1).type))
    damaged = tmp_path / "damaged"
    damaged.mkdir()
    for f in source.iterdir():
        (damaged / f.name).write_bytes(f.read_bytes())
    pq.write_table(cut.cast(table.schema), damaged / "data_0.parquet")
    assert "does not decode with compression_config.yaml" in attempt(folder=damaged)


@pytest.mark.parametrize("out", ["{tmp}/new/..", "/proc/target-sft-export", "{tmp}/" + "x" * 300, "{tmp}/kd.jsonl/sub"])
def test_an_export_to_a_place_it_cannot_write_is_one_line(tiny_build, tmp_path, capsys, out):
    captured = stages.capture_priors(load_config(RunConfig, None, args(tiny_build, tmp_path)), progress=False)
    (tmp_path / "kd.jsonl").write_text("a file, not a folder")
    argv = ["cache", "export", captured.key, "--out", out.format(tmp=tmp_path)]
    capsys.readouterr()
    code, _, err = run([*argv, *[f"--set={a}" for a in args(tiny_build, tmp_path)]], capsys)
    assert (code, errors(err)) == (2, 1), err


@pytest.mark.parametrize("mount", ["ro,size=1m", "size=8k"], ids=["read-only", "full"])
def test_an_export_onto_a_read_only_or_full_disk_is_one_line_and_leaves_nothing(tiny_build, tmp_path, capsys, mount):
    """A real tmpfs (mounting needs root, as CI runs): read-only, or too small for the file."""
    import subprocess

    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    captured = stages.capture_priors(load_config(RunConfig, None, args(tiny_build, tmp_path)), progress=False)
    disk = tmp_path / "disk"
    disk.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", mount, "tmpfs", str(disk)], check=True)
    try:
        argv = ["cache", "export", captured.key, "--out", str(disk / "kd")]
        code, _, err = run([*argv, *[f"--set={a}" for a in args(tiny_build, tmp_path)]], capsys)
        reason = "Read-only file system" if mount.startswith("ro") else "No space left on device"
        assert (code, errors(err), reason in err) == (2, 1, True), err
        assert list(disk.iterdir()) == []  # no half-written folder, no temporary
    finally:
        subprocess.run(["umount", str(disk)], check=True)


def test_a_distillkit_config_that_is_not_a_regular_file_is_one_line(tiny_build, tmp_path, capsys):
    import yaml

    folder = write_distillkit(tiny_build, tmp_path / "fixture", tmp_path / "dk", README_CONFIGS["budget"])
    (folder / "compression_config.yaml").unlink()
    os.mkfifo(folder / "compression_config.yaml")  # reading it would wait for a writer forever
    argv = ["cache", "import", str(folder), "--format", "distillkit"]
    code, _, err = run([*argv, *[f"--set={a}" for a in args(tiny_build, tmp_path)]], capsys)
    assert (code, errors(err), "not a regular file" in err) == (2, 1, True), err
    (folder / "compression_config.yaml").unlink()
    bomb = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"{c}: &{c} [*{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}]\n"
        for p, c in zip("abcdefgh", "bcdefghi", strict=True)
    )
    (folder / "compression_config.yaml").write_text(bomb)
    code, _, err = run([*argv, *[f"--set={a}" for a in args(tiny_build, tmp_path)]], capsys)
    assert (code, errors(err)) == (2, 1) and len(err) < 1000 and "aliases" in err, err
    for bad, phrase in (
        ({"polynomial_terms": [0, 1, 500]}, "overflow float32"),
        ({"k": 1_000_000_000}, "do not describe a top-k"),
        ({"delta_encoding": "maybe"}, "is not a boolean"),
    ):
        (folder / "compression_config.yaml").write_text(yaml.safe_dump({**README_CONFIGS["budget"], **bad}))
        code, _, err = run([*argv, *[f"--set={a}" for a in args(tiny_build, tmp_path)]], capsys)
        assert (code, errors(err), phrase in err) == (2, 1, True), err
    quoted = {**README_CONFIGS["budget"], "delta_encoding": "false"}  # pydantic reads a quoted 'false' as False
    (folder / "compression_config.yaml").write_text(yaml.safe_dump(quoted))
    code, out, err = run([*argv, *[f"--set={a}" for a in args(tiny_build, tmp_path)]], capsys)
    assert code == 0, err
    key = out.split("prior set ")[1].split(":")[0]
    assert PriorStore(str(tmp_path)).manifest(key)["key_inputs"]["engine"]["codec"]["delta_encoding"] is False


def test_a_second_import_of_the_same_source_never_removes_the_first_ones_work(tiny_build, tmp_path, capsys):
    """Two imports of one source write one set: while one holds the set's import lock, the other stops
    with a line, and its failure leaves the first one's shards alone."""
    import fcntl
    import shutil

    fixture = write_axolotl_kd(tiny_build, tmp_path / "fixture", tmp_path / "kd.jsonl")
    argv = ["cache", "import", str(fixture), *[f"--set={a}" for a in args(tiny_build, tmp_path)]]
    code, out, err = run(argv, capsys)
    assert code == 0, err
    key = out.split("prior set ")[1].split(":")[0]
    folder = tmp_path / "priors" / key
    shutil.rmtree(folder)
    (folder / "shards").mkdir(parents=True)  # the first import, mid-way: one shard written
    (folder / "shards" / "00000.parquet").write_bytes(b"in progress")
    with open(tmp_path / "priors" / f".{key}.import.lock", "a") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        code, _, err = run(argv, capsys)
    assert (code, errors(err), "another import" in err) == (2, 1, True), err
    assert (folder / "shards" / "00000.parquet").read_bytes() == b"in progress"
