"""Capture across process deaths and concurrent workers: SIGKILL at random points then resume, two
workers on one set. Apart from tests/test_priors.py so that the longest tests of the suite run
on different workers (`--dist loadfile`)."""

from __future__ import annotations

import json
import random
import subprocess
import sys

import numpy as np

from pipeline.priors.cache import PriorStore
from tests.conftest import REPO
from tests.test_priors import CAPTURE_SCRIPT, capture_and_kill, cfg_args, run_capture, shard_bytes


def test_sigkill_at_random_points_then_resume_gives_identical_content(tiny_build, tmp_path):
    reference_root, killed_root = tmp_path / "reference", tmp_path / "killed"
    run_capture(cfg_args(tiny_build, reference_root))
    key = json.loads(next((reference_root / "priors").glob("*/manifest.json")).read_text())["key"]
    num_shards = len(shard_bytes(reference_root, key))
    shards = killed_root / "priors" / key / "shards"
    timings = (reference_root / "priors" / key / "shards").glob("*.timing.json")
    shard_seconds = float(np.median([json.loads(t.read_text())["seconds"] for t in timings]))
    rng = random.Random(0)
    # random points: after 0..n-3 finished shards, plus a random part of the next shard's time
    for after in sorted(rng.sample(range(num_shards - 2), 5)):
        assert capture_and_kill(cfg_args(tiny_build, killed_root), shards, after, rng.uniform(0, 0.9) * shard_seconds)
        assert not (killed_root / "priors" / key / "_SUCCESS").exists()  # the kill cut the capture short
    run_capture(cfg_args(tiny_build, killed_root))
    assert shard_bytes(killed_root, key) == shard_bytes(reference_root, key)
    store = PriorStore(str(killed_root))
    assert store.verify(key) == []
    # no temporary files are left where readers look
    assert not list((killed_root / "priors" / key / "shards").glob("*.parquet.tmp*"))


def test_two_concurrent_workers_make_one_complete_set(tiny_build, tmp_path):
    reference, shared = tmp_path / "reference", tmp_path / "shared"
    run_capture(cfg_args(tiny_build, reference))
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-c",
                CAPTURE_SCRIPT,
                *cfg_args(tiny_build, shared, "priors.num_workers=2", f"priors.worker_index={i}"),
            ],
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ] + [  # and a third, unpartitioned worker on the same key at the same time
        subprocess.Popen(
            [sys.executable, "-c", CAPTURE_SCRIPT, *cfg_args(tiny_build, shared)],
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
    ]
    for proc in procs:
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err
    key = json.loads(next((reference / "priors").glob("*/manifest.json")).read_text())["key"]
    store = PriorStore(str(shared))
    assert store.complete(key) and store.verify(key) == []
    manifest = store.manifest(key)
    assert [s["index"] for s in manifest["shards"]] == list(range(manifest["counts"]["shards"]))
    assert shard_bytes(shared, key) == shard_bytes(reference, key)
    indices = [r.example_index for r in store.open(key).iter_records()]
    assert len(indices) == len(set(indices)) == manifest["counts"]["examples"]
