"""Prior engines: run a frozen model over tokenised examples, return sparse top-k priors.

Two engines produce the same `PriorRecord`s:

* `HFEngine` (reference and CPU fallback): transformers forward to the last hidden state, then a
  chunked lm_head over the scored positions only, log-sum-exp and top-k; full-batch logits are
  never formed. Batches are built by a token budget over length-sorted examples.
* `VLLMEngine`: vLLM's offline `LLM` with prompt logprobs (`max_tokens=1`, `prompt_logprobs=k`).
* `VLLMServerEngine`: the same request sent to a running `vllm serve` (OpenAI-compatible
  `/v1/completions` with a token-id prompt), after checking that the server holds the prior
  model's vocabulary and tokenizer; every answer is checked against the ids it was sent.

Engines trust their arguments: `priors.plan` checks k against the vocabulary before one is built.

Alignment (docs/design.md §3): the prior row for position t is the distribution of token t+1 given
tokens ≤ t; only positions whose next token is a completion token are scored.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import http.client
import json
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch

from pipeline.common.devices import import_vllm, set_vllm_cpu_environment, shutdown_vllm
from pipeline.common.errors import PriorError
from pipeline.common.models import check_remote_code, load_model
from pipeline.common.prior_schema import Prior, PriorRecord
from pipeline.data.tokens import Example, pad_rows


def drop_ids_beyond(records: dict[int, PriorRecord], rows: int) -> dict[str, float]:
    """Remove top-k entries whose id is at or above `rows`, the student's output rows, in place, and
    say how much prior mass sat there (docs/design.md §3).

    A teacher of the same tokenizer can have more embedding rows than its student (Qwen2.5-Math-7B
    152,064 against the 1.5B's 151,936; the tokenizer has 151,665 entries): those ids are never a token,
    so the student has no logit for them and the loss must never see them. The entries become "no
    entry" (id -1, log-prob -inf); the mass they held goes to the tail, as any mass outside the top-k.
    """
    entries, mass, positions = 0, 0.0, 0
    for index, record in records.items():
        positions += len(record.positions)
        beyond = record.topk_ids >= rows
        if not beyond.any():
            continue
        entries += int(beyond.sum())
        mass += float(np.exp(record.topk_logprobs[beyond].astype(np.float64)).sum())
        ids = np.where(beyond, -1, record.topk_ids).astype(record.topk_ids.dtype)
        logprobs = np.where(beyond, -np.inf, record.topk_logprobs).astype(record.topk_logprobs.dtype)
        records[index] = dataclasses.replace(record, topk_ids=ids, topk_logprobs=logprobs)
    return {"student_rows": rows, "entries_dropped": entries, "mass_per_position": mass / max(positions, 1)}


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
        LLM = import_vllm().LLM

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
        entries = ({token: (lp.logprob, lp.rank) for token, lp in prompt_logprobs[t + 1].items()} for t in positions)
        return from_ranked_entries(example, positions, entries, self.k)

    def close(self) -> None:
        shutdown_vllm(self.llm)
        del self.llm


def from_ranked_entries(
    example: Example, positions: np.ndarray, entries: Iterator[dict[int, tuple[float, int]]], k: int
) -> tuple[np.ndarray, ...]:
    """(top ids, top logprobs, observed logprob, observed rank) from vLLM's per-position prompt
    logprobs: for each scored t, `{token: (logprob, rank)}` of position t+1, the prompt token included."""
    n = len(positions)
    top_ids = np.zeros((n, k), dtype=np.int32)
    top_lp = np.zeros((n, k), dtype=np.float32)
    obs_lp = np.zeros(n, dtype=np.float32)
    obs_rank = np.zeros(n, dtype=np.int32)
    for row, (t, entry) in enumerate(zip(positions, entries, strict=True)):
        obs_lp[row], obs_rank[row] = entry[int(example.input_ids[t + 1])]
        ranked = sorted((rank, token, logprob) for token, (logprob, rank) in entry.items() if rank <= k)[:k]
        top_ids[row] = [token for _, token, _ in ranked]
        top_lp[row] = [logprob for _, _, logprob in ranked]
    return top_ids, top_lp, obs_lp, obs_rank


class VLLMServerEngine:
    """A running OpenAI-compatible vLLM server (`vllm serve MODEL --max-logprobs K`).

    Each example is one `/v1/completions` request: its token ids as the prompt, `max_tokens=1`,
    `prompt_logprobs=k` and `return_token_ids`, so the server scores exactly the ids sent and says
    which ids it scored; `concurrency` requests are in flight and the server batches them. Before
    the first one, the server must list the model, take ids up to the prior model's vocabulary
    size and no further, and tokenise a probe text as the local tokenizer does. A failed request
    (connection, timeout, HTTP 5xx) is retried with backoff; what finally fails raises one line, and
    `priors.capture` keeps the shards already written.
    """

    name = "vllm_server"

    def __init__(
        self,
        url: str,
        model_path: Path,
        k: int,
        max_length: int,
        tokenizer: Any,
        vocab_size: int,
        probe_ids: Sequence[int],
        served_model: str | None = None,
        concurrency: int = 8,
        timeout: float = 600.0,
        retries: int = 3,
    ) -> None:
        self.base, self.headers = split_credentials(url.rstrip("/").removesuffix("/v1"))
        self.k, self.concurrency, self.timeout, self.retries = k, concurrency, timeout, retries
        self._stop = threading.Event()  # set after a failure: in-flight requests give up
        self._open: set[Any] = set()  # responses being read, closed on a failure
        self._lock = threading.Lock()
        self.forward_passes = 0
        self.model = self._served_model(served_model, model_path, max_length)
        self._check_vocabulary(vocab_size)
        self._check_tokenisation(tokenizer, probe_ids)
        self.version = str(self._call("/version").get("version", "unknown"))

    def score(self, examples: list[Example]) -> list[PriorRecord]:
        pool = ThreadPoolExecutor(self.concurrency, thread_name_prefix="vllm-server")
        try:
            records = [f.result() for f in [pool.submit(self._score_one, e) for e in examples]]
        except BaseException:  # a failure or Ctrl-C: cancel what is in flight, report at once
            self._stop.set()
            with self._lock:
                for response in list(self._open):
                    with contextlib.suppress(Exception):
                        response.close()
            raise
        finally:  # drop the requests not yet sent
            pool.shutdown(wait=False, cancel_futures=True)
        self.forward_passes += len(examples)
        return records

    def _score_one(self, example: Example) -> PriorRecord:
        ids = np.asarray(example.input_ids).tolist()
        body = {"model": self.model, "prompt": ids, "max_tokens": 1, "prompt_logprobs": self.k}
        answer = self._call("/v1/completions", {**body, "return_token_ids": True})
        try:
            return self._record(example, ids, answer)
        except (KeyError, TypeError, ValueError, AttributeError, IndexError, OverflowError) as e:
            raise PriorError(
                f"vLLM server {self.base} answered example {example.index} with a malformed completion "
                f"({type(e).__name__}: {str(e)[:120]}); is it a vLLM server of a supported version?"
            ) from None

    def _record(self, example: Example, ids: list[int], answer: dict[str, Any]) -> PriorRecord:
        choice = answer["choices"][0]
        scored, logprobs = choice.get("prompt_token_ids"), choice.get("prompt_logprobs")
        if scored != ids or logprobs is None or len(logprobs) != len(ids):
            scored = scored if isinstance(scored, list) else []
            raise PriorError(
                f"vLLM server {self.base} scored {len(scored)} prompt tokens for example {example.index}, which has "
                f"{len(ids)} (first difference at position {first_difference(ids, scored)}); it must score the ids "
                "as sent"
            )
        positions = scored_positions(example)
        entries = (
            {int(token): (_logprob(v["logprob"]), int(v["rank"])) for token, v in logprobs[t + 1].items()}
            for t in positions
        )
        top_ids, top_lp, obs_lp, obs_rank = from_ranked_entries(example, positions, entries, self.k)
        return PriorRecord(example.index, len(ids), positions, top_ids, top_lp, obs_lp, obs_rank)

    # --- the checks before the first request ------------------------------------------------------
    def _served_model(self, served_model: str | None, model_path: Path, max_length: int) -> str:
        listed = self._call("/v1/models").get("data")
        if not isinstance(listed, list) or not all(isinstance(m, dict) and "id" in m for m in listed):
            raise PriorError(f"{self.base}/v1/models did not list models; is it an OpenAI-compatible vLLM server?")
        names = [str(m["id"]) for m in listed]
        if served_model is not None:
            if served_model not in names:
                raise PriorError(
                    f"vLLM server {self.base} does not serve {served_model!r} (it serves {names}); "
                    "fix priors.server_model"
                )
            chosen = listed[names.index(served_model)]
        elif len(listed) != 1:
            raise PriorError(f"vLLM server {self.base} serves {names}; set priors.server_model to one of them")
        else:
            chosen = listed[0]
            served_as = {Path(str(chosen.get(key) or "")).name for key in ("id", "root")}
            if model_path.name not in served_as:
                raise PriorError(
                    f"vLLM server {self.base} serves {chosen['id']!r}, not the prior model {model_path.name!r}; "
                    "start it on that model, or set priors.server_model if it is the same model by another name"
                )
        longest = chosen.get("max_model_len")
        if isinstance(longest, int) and longest < max_length + 1:
            raise PriorError(
                f"vLLM server {self.base} takes at most {longest} tokens; data.max_length={max_length} needs "
                f"{max_length + 1} (one generated token): restart it with --max-model-len {max_length + 1}"
            )
        return str(chosen["id"])

    def _check_vocabulary(self, vocab_size: int) -> None:
        """vLLM refuses prompt ids beyond its vocabulary: the last id must pass, the next must not."""
        body = {"model": self.model, "max_tokens": 1}
        try:
            self._call("/v1/completions", {**body, "prompt": [vocab_size - 1], "prompt_logprobs": self.k})
            self._call("/v1/completions", {**body, "prompt": [vocab_size]})
        except PriorError as e:
            if "out of vocabulary" in str(e):
                if f"Token id {vocab_size} " in str(e):
                    return
                raise PriorError(
                    f"vLLM server {self.base} has a smaller vocabulary than the prior model ({vocab_size} ids): "
                    "it serves another model"
                ) from None
            raise
        raise PriorError(
            f"vLLM server {self.base} accepts token id {vocab_size}, beyond the prior model's vocabulary of "
            f"{vocab_size}: it serves another model"
        )

    def _check_tokenisation(self, tokenizer: Any, probe_ids: Sequence[int]) -> None:
        text = tokenizer.decode(list(probe_ids))
        local = tokenizer.encode(text, add_special_tokens=False)
        body = {"model": self.model, "prompt": text, "add_special_tokens": False}
        served = self._call("/tokenize", body).get("tokens")
        if served != local:
            first = first_difference(local, served if isinstance(served, list) else [])
            raise PriorError(
                f"vLLM server {self.base} tokenises a probe text differently from the prior model's tokenizer "
                f"(from token {first} of {len(local)}): serve the prior model's own tokenizer"
            )

    # --- HTTP -----------------------------------------------------------------------------------
    def _call(self, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        """The server's JSON answer; retried with backoff (1, 2, 4 ... s) after a connection error,
        a timeout or an HTTP 5xx; a 4xx is the server refusing the request, reported at once."""
        data = None if body is None else json.dumps(body).encode()
        headers = {"Content-Type": "application/json", **self.headers}
        request = urllib.request.Request(self.base + path, data=data, headers=headers)
        failure = ""
        for attempt in range(self.retries + 1):
            if attempt and self._stop.wait(min(2 ** (attempt - 1), 30)):
                break
            if self._stop.is_set():
                break
            try:
                with urllib.request.urlopen(request, timeout=self.timeout) as response:
                    answer = json.loads(self._read(response, time.monotonic() + self.timeout))
                if not isinstance(answer, dict):
                    raise ValueError("not a JSON object")
                return answer
            except urllib.error.HTTPError as e:
                message = _error_message(e)
                if e.code < 500:
                    hint = f"; restart it with --max-logprobs {self.k}" if "max allowed" in message else ""
                    hint += "; is this URL a vLLM server (vllm serve)?" if e.code == 404 else ""
                    refused = f"vLLM server {self.base} refused {path} (HTTP {e.code}): {message}{hint}"
                    raise PriorError(refused) from None
                failure = f"HTTP {e.code}: {message}"
            except (urllib.error.URLError, TimeoutError, ConnectionError, http.client.HTTPException) as e:
                reason = getattr(e, "reason", e)
                failure = f"timed out after {self.timeout:g} s" if isinstance(reason, TimeoutError) else str(reason)
            except (ValueError, RecursionError) as e:  # JSONDecodeError too
                what = "JSON nested too deeply" if isinstance(e, RecursionError) else str(e)[:120]
                raise PriorError(f"{self.base}{path} did not answer JSON ({what}); is it a vLLM server?") from None
        if self._stop.is_set():
            failure = failure or "cancelled after another request failed"
        tries = f"{self.retries + 1} tries" if self.retries else "1 try"
        raise PriorError(
            f"vLLM server {self.base} did not answer {path} ({tries}; last: {failure}); check it is up "
            f"(curl {self.base}/v1/models) and rerun: finished shards are kept"
        )

    def _read(self, response: Any, deadline: float) -> bytes:
        """The whole body by the deadline: `timeout` bounds each socket read, not a server that
        trickles a byte at a time, so the request as a whole gets one too."""
        with self._lock:
            self._open.add(response)
        try:
            chunks = []
            while chunk := response.read1(1 << 16):
                chunks.append(chunk)
                if time.monotonic() > deadline or self._stop.is_set():
                    raise TimeoutError(f"no whole answer within {self.timeout:g} s")
            return b"".join(chunks)
        finally:
            with self._lock:
                self._open.discard(response)

    def close(self) -> None:
        pass


def first_difference(a: Sequence[int], b: Sequence[int]) -> int:
    """The first position where two id sequences differ (the shorter one's length if one is a prefix)."""
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))


def _logprob(value: float) -> float:
    return float("-inf") if value <= -9999.0 else float(value)  # the server writes -inf as -9999.0


def split_credentials(url: str) -> tuple[str, dict[str, str]]:
    """`http://user:secret@host/...` → the URL without its user part (safe to print in any error
    line or hint) and the HTTP Basic header that carries it."""
    parts = urllib.parse.urlsplit(url)
    if parts.username is None and parts.password is None:
        return url, {}
    host = parts.hostname or ""
    netloc = f"[{host}]" if ":" in host else host
    netloc += f":{parts.port}" if parts.port else ""
    user = urllib.parse.unquote(parts.username or "")
    secret = urllib.parse.unquote(parts.password or "")
    token = base64.b64encode(f"{user}:{secret}".encode()).decode()
    return urllib.parse.urlunsplit(parts._replace(netloc=netloc)), {"Authorization": f"Basic {token}"}


def _error_message(error: urllib.error.HTTPError) -> str:
    try:
        body = json.loads(error.read())
        message = body.get("error", {}).get("message") if isinstance(body.get("error"), dict) else body.get("message")
        return " ".join(str(message or body).split())[:300]
    except Exception:
        return str(error.reason)
