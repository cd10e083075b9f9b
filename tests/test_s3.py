"""s3:// storage through fsspec, against a real S3-compatible server (moto) on 127.0.0.1."""

from __future__ import annotations

import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from pipeline.common.config import load_config
from pipeline.entry import stages
from pipeline.entry.config import RunConfig
from pipeline.priors.cache import CacheError, PriorStore
from tests.conftest import free_port, tiny_args


@pytest.fixture
def s3_server(monkeypatch):
    """moto's S3 server in its own process on 127.0.0.1 (its Flask stack stays out of this one)."""
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 30
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            if time.monotonic() > deadline or server.poll() is not None:
                server.kill()
                raise RuntimeError("moto server did not start") from None
            time.sleep(0.1)
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing-secret-value")
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()
    s3fs.S3FileSystem().mkdir("priors-bucket")
    yield "s3://priors-bucket/team"
    s3fs.S3FileSystem.clear_instance_cache()
    server.terminate()
    server.wait(timeout=30)


def overrides(tiny_build, root):
    return tiny_args(tiny_build, root, "priors.shard_size=16")


def test_s3_round_trip_matches_local(s3_server, tiny_build, tmp_path):
    remote = stages.capture_priors(load_config(RunConfig, None, overrides(tiny_build, s3_server)), progress=False)
    local = stages.capture_priors(load_config(RunConfig, None, overrides(tiny_build, tmp_path)), progress=False)
    assert remote.key == local.key and remote.manifest_path.startswith("s3://priors-bucket/team/priors/")
    again = stages.capture_priors(load_config(RunConfig, None, overrides(tiny_build, s3_server)), progress=False)
    assert again.forward_passes == 0
    store = PriorStore(s3_server)
    assert store.verify(remote.key) == []
    assert store.list_keys() == [remote.key]
    manifest_text = store.fs.cat_file(f"{store.dir(remote.key)}/manifest.json").decode()
    assert "testing-secret-value" not in manifest_text  # credentials never reach the manifest
    a, b = store.open(remote.key).load_all(), PriorStore(str(tmp_path)).open(local.key).load_all()
    assert a.keys() == b.keys()
    for index in a:
        np.testing.assert_array_equal(a[index].topk_ids, b[index].topk_ids)
        np.testing.assert_array_equal(a[index].topk_logprobs, b[index].topk_logprobs)


def test_missing_s3_credentials_fail_clearly(s3_server, tiny_build, monkeypatch):
    import s3fs

    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent")
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent")
    s3fs.S3FileSystem.clear_instance_cache()
    with pytest.raises(CacheError, match="no credentials for s3://priors-bucket/team"):
        stages.capture_priors(load_config(RunConfig, None, overrides(tiny_build, s3_server)), progress=False)


@pytest.mark.parametrize(
    "action",
    [
        ["ls"],
        ["show", "0123456789abcdef0123"],
        ["verify", "0123456789abcdef0123"],
        ["import", "{fixture}"],
        ["export", "0123456789abcdef0123", "--out", "{out}"],
    ],
    ids=["ls", "show", "verify", "import", "export"],
)
def test_cache_commands_without_s3_credentials_are_one_line(
    s3_server, tiny_build, tmp_path, monkeypatch, capsys, action
):
    """`cache ls s3://…` with no credentials said a botocore traceback; now what `priors` says."""
    import s3fs

    from pipeline.entry import cli

    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(name)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent")
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent")
    s3fs.S3FileSystem.clear_instance_cache()
    from tests.test_interop import write_axolotl_kd

    fixture = write_axolotl_kd(tiny_build, tmp_path / "local", tmp_path / "kd.jsonl") if "import" in action else None
    action = [a.format(fixture=fixture, out=tmp_path / "out") for a in action]
    extra = [f"--set={a}" for a in overrides(tiny_build, s3_server)] if action[0] in ("import", "export") else []
    assert cli.main(["cache", *action, f"--set=storage_root={s3_server}", *extra]) == 2
    err = capsys.readouterr().err
    err = "".join(line + "\n" for line in err.splitlines() if line.strip() and "%|" not in line)
    assert err.count("\n") == 1 and "no credentials for s3://priors-bucket/team" in err, err
