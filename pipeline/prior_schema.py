"""The Parquet schema of a prior shard: the one contract between stage 1 and stage 2.

One row per example. Lists are flat: an example with n scored positions and top-k priors has
n entries in `positions`, `obs_logprob_q`, `obs_rank` and n·k entries in `topk_ids` and
`topk_logprob_q` (row-major: position 0's k entries first, most likely token first).

Log-probabilities are stored as uint16 codes, `code = round(−logprob · 64)` (step 1/64, so the
rounding error is at most 1/128 ≈ 0.0078 for every logprob ≥ −1023.98), with code 65535 meaning
−inf / below range. The top-k codes of one position are non-decreasing, so they are stored
delta-coded (first code, then differences): small numbers that Parquet's zstd compresses well.
Token ids are int32. Decoding: `decode_logprobs`.

Columns:
    example_index   int64          row index of the example in the source dataset
    num_tokens      int32          length of the tokenised example (for alignment checks)
    positions       list<int32>    scored positions t (the token at t+1 is a completion token)
    topk_ids        list<int32>    prior top-k token ids, n·k
    topk_logprob_q  list<uint16>   delta-coded uint16 codes of the top-k logprobs, n·k
    obs_logprob_q   list<uint16>   code of the prior logprob of the observed token y = x[t+1], n
    obs_rank        list<int32>    1-based rank of y under the prior (1 = most likely), n
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

SCHEMA_VERSION = 1
SCALE = 64.0
NEG_INF_CODE = np.iinfo(np.uint16).max
MAX_ABS_ERROR = 0.5 / SCALE

SCHEMA = pa.schema(
    [
        pa.field("example_index", pa.int64(), nullable=False),
        pa.field("num_tokens", pa.int32(), nullable=False),
        pa.field("positions", pa.list_(pa.int32()), nullable=False),
        pa.field("topk_ids", pa.list_(pa.int32()), nullable=False),
        pa.field("topk_logprob_q", pa.list_(pa.uint16()), nullable=False),
        pa.field("obs_logprob_q", pa.list_(pa.uint16()), nullable=False),
        pa.field("obs_rank", pa.list_(pa.int32()), nullable=False),
    ],
    metadata={b"target_sft.prior_schema_version": str(SCHEMA_VERSION).encode()},
)


def encode_logprobs(logprobs: np.ndarray) -> np.ndarray:
    """float logprobs (≤ 0, may be −inf) → uint16 codes."""
    scaled = np.rint(-np.asarray(logprobs, dtype=np.float64) * SCALE)
    scaled = np.nan_to_num(scaled, nan=NEG_INF_CODE, posinf=NEG_INF_CODE)
    return np.clip(scaled, 0, NEG_INF_CODE).astype(np.uint16)


def decode_logprobs(codes: np.ndarray) -> np.ndarray:
    """uint16 codes → float32 logprobs (−inf for the sentinel)."""
    out = -codes.astype(np.float32) / SCALE
    out[codes == NEG_INF_CODE] = -np.inf
    return out


def delta_encode(codes: np.ndarray, k: int) -> np.ndarray:
    """Per position (rows of k), keep the first code and the non-negative differences."""
    rows = codes.reshape(-1, k).astype(np.int32)
    rows[:, 1:] = np.diff(rows, axis=1)
    return rows.reshape(-1).astype(np.uint16)


def delta_decode(deltas: np.ndarray, k: int) -> np.ndarray:
    """Inverse of `delta_encode` (the sentinel saturates instead of wrapping)."""
    rows = np.cumsum(deltas.reshape(-1, k).astype(np.int64), axis=1)
    return np.minimum(rows, NEG_INF_CODE).reshape(-1).astype(np.uint16)
