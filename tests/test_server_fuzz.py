"""Every value a vLLM server answers is checked for meaning (pipeline/priors/engines.py, and the prior
schema's contract): a server that answers like vLLM, with one field of one answer changed at a time.

The stand-in speaks vLLM 0.32's OpenAI-compatible API as the engine reads it (`/v1/models`,
`/version`, `/tokenize`, `/v1/completions` with `prompt_logprobs` and `return_token_ids`), with the
tiny model's real prompt logprobs computed by transformers. The real server is tested in
tests/test_vllm_server.py (slow: its start takes minutes); this one starts in milliseconds, so the
mutations run in the default suite. Every mutation ends in one error line with no complete set, or
in a set equal to the clean one.
"""

from __future__ import annotations

import copy
import json
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from pipeline.priors.cache import PriorStore
from tests.test_vllm_server import capture, server_args

K = 8
Mutation = Callable[[dict[str, Any]], Any]


class FakeVLLM:
    """A vLLM-shaped server over the tiny model; `mutate` rewrites the Nth completion answer."""

    def __init__(self, build: Any) -> None:
        self.model = AutoModelForCausalLM.from_pretrained(build.model).eval()
        self.tokenizer = AutoTokenizer.from_pretrained(build.model)
        self.name = str(build.model)
        self.vocab = int(self.model.config.vocab_size)
        self.mutate: Mutation | None = None
        self.mutate_at = 0  # which scoring request (0-based, vocabulary probes excluded) gets mutated
        self.requests = 0
        self.trickle = False
        self.in_flight = 0  # requests being answered (an earlier test's may still be)
        self.lock = threading.Lock()
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def do_GET(self) -> None:
                if self.path == "/v1/models":
                    data = [{"id": fake.name, "root": fake.name, "max_model_len": 2048}]
                    self.answer(200, {"object": "list", "data": data})
                elif self.path == "/version":
                    self.answer(200, {"version": "0.32.0"})
                else:
                    self.answer(404, {"detail": "Not Found"})

            def do_POST(self) -> None:
                with fake.lock:
                    fake.in_flight += 1
                try:
                    self.answer_post()
                finally:
                    with fake.lock:
                        fake.in_flight -= 1

            def answer_post(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                if self.path == "/tokenize":
                    ids = fake.tokenizer.encode(body["prompt"], add_special_tokens=False)
                    self.answer(200, {"tokens": ids, "count": len(ids)})
                elif self.path == "/v1/completions":
                    status, answer = fake.complete(body)
                    self.answer(status, answer)
                else:
                    self.answer(404, {"detail": "Not Found"})

            def answer(self, status: int, payload: Any) -> None:
                raw = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(raw)))
                self.end_headers()
                if fake.trickle and self.path == "/v1/completions" and status == 200:
                    for i in range(len(raw)):  # one byte at a time: every read returns in time
                        self.wfile.write(raw[i : i + 1])
                        self.wfile.flush()
                        time.sleep(0.05)
                else:
                    self.wfile.write(raw)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    def complete(self, body: dict[str, Any]) -> tuple[int, Any]:
        ids = body["prompt"]
        if any(i >= self.vocab for i in ids):
            bad = next(i for i in ids if i >= self.vocab)
            message = f"Token id {bad} is out of vocabulary (vocab size {self.vocab})"
            return 400, {"error": {"message": message, "type": "BadRequestError", "code": 400}}
        k = body.get("prompt_logprobs") or 0
        with torch.no_grad():
            logprobs = self.model(torch.tensor([ids])).logits[0].log_softmax(-1)
        prompt_logprobs: list[Any] = [None]
        for t in range(1, len(ids)):
            row = logprobs[t - 1]
            order = torch.argsort(row, descending=True)
            ranks = torch.empty_like(order)
            ranks[order] = torch.arange(1, len(order) + 1)
            entry = {}
            for token in [*order[:k].tolist(), ids[t]]:
                entry[str(token)] = {"logprob": float(row[token]), "rank": int(ranks[token]), "decoded_token": "x"}
            prompt_logprobs.append(entry)
        choice = {"index": 0, "text": "x", "prompt_token_ids": ids, "prompt_logprobs": prompt_logprobs}
        answer = {"id": "cmpl-1", "object": "text_completion", "model": self.name, "choices": [choice]}
        if k and len(ids) > 1:  # a scoring request, not a vocabulary probe
            with self.lock:
                n, self.requests = self.requests, self.requests + 1
            if self.mutate is not None and n == self.mutate_at:
                return 200, self.mutate(copy.deepcopy(answer))
        return 200, answer

    def start_trial(self, mutate: Mutation | None, mutate_at: int) -> None:
        """Count requests afresh for one test, once the requests an earlier test left in flight (its
        client gave up on them) are answered: counted here, they would shift `mutate_at`."""
        deadline = time.monotonic() + 60
        while self.in_flight and time.monotonic() < deadline:
            time.sleep(0.01)
        with self.lock:
            self.mutate, self.mutate_at, self.requests = mutate, mutate_at, 0

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def fake_server(tiny_build) -> Iterator[FakeVLLM]:
    server = FakeVLLM(tiny_build)
    yield server
    server.close()


def set_value(field: str, value: Any) -> Mutation:
    def change(answer: dict[str, Any]) -> dict[str, Any]:
        for item in answer["choices"][0]["prompt_logprobs"][1:]:
            item[next(iter(item))][field] = value
        return answer

    return change


def rename_token(new: int) -> Mutation:
    def change(answer: dict[str, Any]) -> dict[str, Any]:
        for item in answer["choices"][0]["prompt_logprobs"][1:]:
            old = next(iter(item))
            item[str(new)] = item.pop(old)
        return answer

    return change


def swap_ranks(answer: dict[str, Any]) -> dict[str, Any]:
    """Ranks that contradict their log-probs: the most likely token ranked last of the top-k."""
    for item in answer["choices"][0]["prompt_logprobs"][1:]:
        tokens = list(item)
        item[tokens[0]]["rank"], item[tokens[K - 1]]["rank"] = item[tokens[K - 1]]["rank"], item[tokens[0]]["rank"]
    return answer


def deep(_: dict[str, Any]) -> bytes:
    return b"[" * 200_000 + b"]" * 200_000


MUTATIONS: dict[str, Mutation] = {
    "logprob-nan": set_value("logprob", float("nan")),
    "logprob-inf": set_value("logprob", float("inf")),
    "logprob-positive": set_value("logprob", 2.5),
    "logprob-string": set_value("logprob", "high"),
    "rank-negative": set_value("rank", -1),
    "rank-null": set_value("rank", None),
    "id-beyond-vocabulary": rename_token(10_000),
    "id-negative": rename_token(-1),
    "ranks-contradict-logprobs": swap_ranks,
    # the last entry: the distribution over the last token, always a completion token, so scored
    "entry-null": lambda a: (a["choices"][0]["prompt_logprobs"].__setitem__(-1, None), a)[1],
    "entry-list": lambda a: (a["choices"][0]["prompt_logprobs"].__setitem__(-1, [1, 2]), a)[1],
    "logprobs-missing": lambda a: (a["choices"][0].pop("prompt_logprobs"), a)[1],
    "choices-empty": lambda a: {**a, "choices": []},
    "choices-string": lambda a: {**a, "choices": "none"},
    "answer-a-list": lambda a: [a],
    "ids-changed": lambda a: (a["choices"][0]["prompt_token_ids"].__setitem__(3, 7), a)[1],
    "json-200000-deep": deep,
    "not-json": lambda a: b"<html>busy</html>",
}


def complete_sets(root: Path) -> list[str]:
    folder = root / "priors"
    return sorted(p.parent.name for p in folder.glob("*/_SUCCESS")) if folder.exists() else []


@pytest.fixture(scope="module")
def clean(fake_server, tiny_build, tmp_path_factory) -> dict[int, Any]:
    root = tmp_path_factory.mktemp("clean")
    fake_server.mutate = None
    code = __import__("pipeline.entry.cli", fromlist=["main"]).main(
        ["priors", str(Path(__file__).parent.parent / "configs/worlds/model-strong.yaml")]
        + [f"--set={a}" for a in server_args(tiny_build, root, fake_server.url, f"priors.k={K}", "data.limit=6")]
    )
    assert code == 0
    key = complete_sets(root)[0]
    return PriorStore(str(root)).open(key).load_all()


@pytest.mark.parametrize("name", list(MUTATIONS))
def test_a_mutated_server_answer_is_one_line_and_never_a_complete_set(
    fake_server, clean, tiny_build, tmp_path, capsys, name
):
    fake_server.start_trial(MUTATIONS[name], 2)
    try:
        argv = server_args(tiny_build, tmp_path, fake_server.url, f"priors.k={K}", "data.limit=6")
        code, _, err = capture([*argv, "priors.server_retries=0", "priors.server_concurrency=1"], capsys)
    finally:
        fake_server.mutate = None
    if code == 0:  # only a change that means nothing may pass, and then the set is the clean one
        key = complete_sets(tmp_path)[0]
        got = PriorStore(str(tmp_path)).open(key).load_all()
        for index in clean:
            for field in ("topk_ids", "topk_logprobs", "obs_logprob", "obs_rank"):
                np.testing.assert_array_equal(getattr(clean[index], field), getattr(got[index], field))
        pytest.fail(f"{name} changes a scored position's answer, yet was accepted")  # every mutation here does
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and len(lines[0]) < 600, err
    assert complete_sets(tmp_path) == []


def test_a_password_in_the_server_url_is_sent_as_basic_auth_and_never_printed(
    fake_server, tiny_build, tmp_path, capsys
):
    url = fake_server.url.replace("http://", "http://admin:hunter2@")
    broken = url.replace(str(fake_server.server.server_address[1]), "1")  # nothing listens on port 1
    code, _, err = capture(server_args(tiny_build, tmp_path, broken, "priors.server_retries=0"), capsys)
    assert code == 2 and "hunter2" not in err and "admin" not in err and "127.0.0.1:1" in err, err
    code, _, err = capture(server_args(tiny_build, tmp_path, "http://admin:hunter2@bad host", ""), capsys)
    assert code == 2 and "hunter2" not in err, err
    code, _, err = capture(server_args(tiny_build, tmp_path, url, f"priors.k={K}", "data.limit=2"), capsys)
    assert code == 0, err  # the credentials reach the server as a header; the capture works


def test_a_server_that_trickles_its_answer_meets_the_request_deadline(fake_server, tiny_build, tmp_path, capsys):
    fake_server.trickle = True
    started = time.monotonic()
    try:
        argv = server_args(tiny_build, tmp_path, fake_server.url, f"priors.k={K}", "data.limit=2")
        code, _, err = capture([*argv, "priors.server_timeout=2", "priors.server_retries=0"], capsys)
    finally:
        fake_server.trickle = False
    assert code == 2 and ("timed out" in err or "within 2 s" in err), err
    assert time.monotonic() - started < 30
