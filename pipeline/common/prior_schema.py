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
    obs_rank        list<int32>    1-based rank of y under the prior (1 = most likely), n;
                                   0 = unknown (an import whose source never stored y's log-prob)

The contract every writer passes (`conform`, called by `PriorStore.write_shard`; docs/design.md §4):
ids are integers in [0, V) with no repeat among a position's finite entries; log-probs are finite or
−inf, ≤ 0 and non-increasing along the k; a position's top-k mass is ≤ 1 + MASS_TOLERANCE; the
observed log-prob is ≤ 0, equals its top-k entry where 1 ≤ rank ≤ k, is no larger than the k-th
where rank > k, and is −inf where the rank is unknown (0). Values in (0, CLAMP_TOLERANCE] are read
as 0 and counted; anything else is refused with one line. `table_problems` checks a stored shard
against the same contract (`cache verify`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, NamedTuple

import numpy as np
import pyarrow as pa

from pipeline.common.errors import PriorError

if TYPE_CHECKING:
    from torch import Tensor

SCHEMA_VERSION = 1
SCALE = 64.0
NEG_INF_CODE = np.iinfo(np.uint16).max
MAX_ABS_ERROR = 0.5 / SCALE

CLAMP_TOLERANCE = 1.0 / SCALE
"""How far above 0 a log-probability may be and still be read as 0 (the clamp is counted): one
code step, more than the rounding a bf16 producer adds to a log-prob near 0."""
MASS_TOLERANCE = 0.02
"""How far above 1 a position's top-k mass may be: bf16 rounding of k values near 0 (2⁻⁸ each at
most) and the codes' 1/128 step; 0.02 over 1 is already a producer that is not normalised."""

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


@dataclass
class PriorRecord:
    """Sparse prior of one example at its scored positions (n of them): the type every engine and
    import produces and every reader gets back."""

    example_index: int
    num_tokens: int
    positions: np.ndarray
    """[n] int32 scored positions t."""
    topk_ids: np.ndarray
    """[n, k] int32, most likely first."""
    topk_logprobs: np.ndarray
    """[n, k] float32, non-increasing."""
    obs_logprob: np.ndarray
    """[n] float32 prior log-probability of the observed next token (−inf where unknown)."""
    obs_rank: np.ndarray
    """[n] int32 1-based rank of the observed next token; 0 where unknown."""


class Prior(NamedTuple):
    """A prior as the loss reads it: tensors aligned with the labels (rows whose label is -100 are
    ignored), built from `PriorRecord`s by `prior_engines.aligned_prior(s)`."""

    ids: Tensor
    """[..., k] top-k token ids, -1 where padded."""
    logprobs: Tensor
    """[..., k] their log-probabilities, -inf where padded."""
    obs_logprob: Tensor
    """[...] the prior's log-probability of the observed token."""

    def map(self, fn: Callable[[Tensor], Tensor]) -> Prior:
        """The same prior with `fn` applied to each tensor (move, flatten, select rows)."""
        return Prior(fn(self.ids), fn(self.logprobs), fn(self.obs_logprob))


def conform(record: PriorRecord, vocab: int, lossy: bool = False, where: str = "") -> tuple[PriorRecord, int]:
    """`record` checked against the contract, with log-probs in (0, CLAMP_TOLERANCE] set to 0; and
    how many were clamped.

    `lossy` is for a lossy codec's decoded values (DistillKit's curve fit): there every positive
    value is clamped and counted, and the mass bound does not apply, since the codec's error is the
    source's, not a broken producer's.

    Raises:
        PriorError: one line naming the example, the position and the rule broken.
    """
    n = len(record.positions)
    ids, lps = np.asarray(record.topk_ids), np.asarray(record.topk_logprobs, dtype=np.float32)
    obs, rank = np.asarray(record.obs_logprob, dtype=np.float32), np.asarray(record.obs_rank)
    where = where or f"example {record.example_index}"

    def refuse(bad: np.ndarray, rule: str) -> PriorError:
        row = int(np.nonzero(bad.reshape(n, -1).any(axis=1) if bad.ndim > 1 else bad)[0][0])
        error = PriorError(
            f"{where}, position {int(record.positions[row])}: {rule}; not a prior this pipeline can store"
        )
        error.row, error.rule = row, rule  # type: ignore[attr-defined]  # for table_problems
        return error

    if ids.ndim != 2 or lps.shape != ids.shape or obs.shape != (n,) or rank.shape != (n,) or ids.shape[0] != n:
        raise PriorError(f"{where}: top-k ids {ids.shape}, log-probs {lps.shape}, observed {obs.shape}, ranks "
                         f"{rank.shape} for {n} positions; a writer broke the prior schema")  # fmt: skip
    if not np.issubdtype(ids.dtype, np.integer):
        raise PriorError(f"{where}: token ids of type {ids.dtype}, not integers")
    if not np.issubdtype(rank.dtype, np.integer):
        raise PriorError(f"{where}: observed ranks of type {rank.dtype}, not integers")
    if n == 0:
        return record, 0
    if (bad := (ids < 0) | (ids >= vocab)).any():
        raise refuse(bad, f"token id {int(ids[bad][0])} is outside the prior model's vocabulary [0, {vocab})")
    if (bad := np.isnan(lps) | np.isposinf(lps)).any():
        raise refuse(bad, f"top-k log-prob {float(lps[bad][0])}")
    limit = np.inf if lossy else CLAMP_TOLERANCE
    if (bad := lps > limit).any():
        raise refuse(bad, f"top-k log-prob {float(lps[bad][0]):+.4g} > 0, not a log-probability")
    if (bad := np.diff(lps, axis=1) > 0).any():
        raise refuse(bad, "top-k log-probs not sorted most likely first")
    finite = np.isfinite(lps)
    if (empty := np.asarray(~finite.any(axis=1))).any():
        raise refuse(empty, "its top-k holds no finite log-prob (a padding row where a prior belongs)")
    order = np.sort(np.where(finite, ids, -1 - np.arange(ids.shape[1])), axis=1)
    if (bad := (order[:, 1:] == order[:, :-1]) & (order[:, 1:] >= 0)).any():
        raise refuse(bad, f"token id {int(order[:, 1:][bad][0])} appears twice in one position's top-k")
    if not lossy and (bad := np.exp(np.minimum(lps, 0).astype(np.float64)).sum(axis=1) > 1 + MASS_TOLERANCE).any():
        mass = float(np.exp(np.minimum(lps, 0).astype(np.float64)).sum(axis=1)[bad][0])
        raise refuse(
            bad, f"the top-k holds probability mass {mass:.3g} > 1; the values are not log-probs of one distribution"
        )
    if (bad := np.isnan(obs) | (obs > limit)).any():
        raise refuse(bad, f"observed log-prob {float(obs[bad][0]):+.4g}, not a log-probability")
    if (bad := rank < 0).any():
        raise refuse(bad, f"observed rank {int(rank[bad][0])} < 0")
    if (bad := (rank == 0) & np.isfinite(obs)).any():
        raise refuse(bad, "an observed log-prob without its rank (0 means unknown)")
    k = ids.shape[1]
    clamped_lps, clamped_obs = np.minimum(lps, 0), np.minimum(obs, 0)
    inside = (rank >= 1) & (rank <= k)
    at_rank = clamped_lps[np.arange(n), np.clip(rank - 1, 0, k - 1)]
    tolerance = np.inf if lossy else CLAMP_TOLERANCE
    if (bad := inside & ~(np.abs(clamped_obs - at_rank) <= tolerance)).any():
        raise refuse(bad, "the observed log-prob differs from the top-k entry its rank names")
    if (bad := (rank > k) & (clamped_obs > clamped_lps[:, -1] + CLAMP_TOLERANCE)).any():
        raise refuse(bad, f"an observed rank beyond the top-{k} with a log-prob above the k-th entry's")
    clamped = int((lps > 0).sum() + (obs > 0).sum())
    if clamped:
        record = replace(record, topk_logprobs=clamped_lps, obs_logprob=clamped_obs)
    return record, clamped


def encode_logprobs(logprobs: np.ndarray) -> np.ndarray:
    """float logprobs (≤ 0, may be −inf) → uint16 codes; values below the range become the −inf code.

    Raises:
        PriorError: a NaN, +inf or positive value (`conform` clamps or refuses those first).
    """
    lp = np.asarray(logprobs, dtype=np.float64)
    if (np.isnan(lp) | (lp > 0)).any():
        raise PriorError("a log-prob that is NaN or > 0 reached the encoder; a writer skipped prior_schema.conform")
    scaled = np.nan_to_num(np.rint(-lp * SCALE), posinf=NEG_INF_CODE)
    return np.minimum(scaled, NEG_INF_CODE).astype(np.uint16)


def decode_logprobs(codes: np.ndarray) -> np.ndarray:
    """uint16 codes → float32 logprobs (−inf for the sentinel)."""
    out = -codes.astype(np.float32) / SCALE
    out[codes == NEG_INF_CODE] = -np.inf
    return out


def delta_encode(codes: np.ndarray, k: int) -> np.ndarray:
    """Per position (rows of k), keep the first code and the non-negative differences.

    Raises:
        PriorError: a negative difference (log-probs not sorted most likely first), which as uint16
            would wrap and saturate the rest of the row at the −inf sentinel.
    """
    rows = codes.reshape(-1, k).astype(np.int32)
    rows[:, 1:] = np.diff(rows, axis=1)
    if (rows[:, 1:] < 0).any():
        raise PriorError("top-k log-probs not sorted most likely first reached the encoder; sort them (prior_schema)")
    return rows.reshape(-1).astype(np.uint16)


def delta_decode(deltas: np.ndarray, k: int) -> np.ndarray:
    """Inverse of `delta_encode` (the sentinel saturates instead of wrapping)."""
    rows = np.cumsum(deltas.reshape(-1, k).astype(np.int64), axis=1)
    return np.minimum(rows, NEG_INF_CODE).reshape(-1).astype(np.uint16)


def table_problems(table: pa.Table, k: int, vocab: int | None, lossy: bool) -> list[str]:
    """What in a stored shard breaks the contract (empty = nothing): the check `cache verify` runs on
    the decoded values, and on the codes, where a delta that wrapped shows as a row whose running sum
    passes the −inf sentinel instead of landing on it."""

    def flat(column: str) -> np.ndarray:
        return table.column(column).combine_chunks().values.to_numpy(zero_copy_only=False)

    deltas = flat("topk_logprob_q").reshape(-1, k).astype(np.int64)
    if (np.cumsum(deltas, axis=1) > NEG_INF_CODE).any():
        return [
            "top-k log-probs hit the −inf sentinel mid-row (a writer stored them unsorted; the rest of the row is lost)"
        ]
    counts = [len(p) for p in table.column("positions").to_pylist()]
    indices = np.repeat(table.column("example_index").to_numpy(), counts)
    lps = decode_logprobs(delta_decode(flat("topk_logprob_q"), k)).reshape(-1, k)
    positions = flat("positions")
    ids, observed = flat("topk_ids").reshape(-1, k), decode_logprobs(flat("obs_logprob_q"))
    record = PriorRecord(-1, 0, positions, ids, lps, observed, flat("obs_rank"))
    try:
        conform(record, vocab if vocab is not None else np.iinfo(np.int32).max, lossy)
    except PriorError as e:
        if not hasattr(e, "row"):
            return [str(e)]
        return [f"example {int(indices[e.row])}, position {int(positions[e.row])}: {e.rule}"]  # type: ignore[attr-defined]
    return []
