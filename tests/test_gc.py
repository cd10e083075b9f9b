"""`target-sft cache gc` removes exactly the dead entries of a storage root (pipeline/entry/prune.py)."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

from pipeline.entry import cli
from pipeline.entry.prune import _lock
from pipeline.training.checkpoints import run_lock
from tests.conftest import REPO, tiny_args

DEMO = str(REPO / "configs" / "worlds" / "model-strong.yaml")
DAY = 86400


def _train(build, root: Path, name: str) -> None:
    """Priors (once), then a two-step Target-SFT run."""
    sets = tiny_args(build, root, f"train.name={name}", "train.max_steps=2", "train.batch_size=4",
                     "train.micro_batch_size=4", "train.eval_every=0", "train.threads=1", "data.limit=16",
                     "train.target=target_sft")  # fmt: skip
    assert cli.main(["priors", DEMO, *(f"--set={s}" for s in sets)]) == 0
    assert cli.main(["train", DEMO, *(f"--set={s}" for s in sets)]) == 0


def _age(path: Path, days: float) -> None:
    """Make `path` and everything in it look `days` old."""
    stamp = time.time() - days * DAY
    for p in [path, *(path.rglob("*") if path.is_dir() else [])]:
        os.utime(p, (stamp, stamp), follow_symlinks=False)


def test_gc_dry_run_lists_and_gc_removes_exactly_the_dead_entries(tiny_build, tmp_path, capsys):
    root = tmp_path / "root"
    _train(tiny_build, root, "live")  # finished: final/, priors, tokens it was built from
    runs, tokens = root / "runs", root / "tokens"
    (live_tokens,) = [p for p in tokens.iterdir() if p.is_dir() and not p.name.startswith(".")]
    (prior_set,) = [p for p in (root / "priors").iterdir() if p.is_dir()]

    # dead: what killed writers and abandoned runs leave behind
    dead = {
        runs / "killed": lambda p: (shutil.copytree(runs / "live", p), shutil.rmtree(p / "final")),
        tokens / "0123abcd": lambda p: (shutil.copytree(live_tokens, p), (p / "meta.json").write_text(
            json.dumps({**json.loads((live_tokens / "meta.json").read_text()), "fingerprint": "f" * 64}))),
        tokens / "damaged": lambda p: (shutil.copytree(live_tokens, p), (p / "meta.json").unlink()),
        tokens / f".{live_tokens.name}.tmp-1a2b3c4d": lambda p: shutil.copytree(live_tokens, p),
        runs / "live" / "checkpoints" / ".step-000009.tmp": lambda p: p.mkdir(),
        prior_set / "shards" / ".00007.parquet.tmp-deadbeef": lambda p: p.write_bytes(b"x" * 100),
        root / "evals" / "gone": lambda p: (p.mkdir(parents=True), (p / "report.json").write_text(
            json.dumps({"model": str(tmp_path / "deleted-model")}))),
    }  # fmt: skip
    # alive although they look dead: held, listed by an experiment, or too young
    alive = {
        runs / "busy": lambda p: shutil.copytree(runs / "killed", p),  # its lock is held below
        tokens / "busy": lambda p: shutil.copytree(tokens / "0123abcd", p),  # its lock is held below
        runs / "listed": lambda p: shutil.copytree(runs / "killed", p),
        root / "experiments" / "x": lambda p: (p.mkdir(parents=True), (p / "summary.json").write_text(
            json.dumps({"runs": [{"run": "listed", "status": "failed"}]}))),
        runs / "young": lambda p: shutil.copytree(runs / "killed", p),  # not aged: may yet be resumed
    }  # fmt: skip
    for path, make in [*dead.items(), *alive.items()]:
        make(path)
    for path in [*dead, *alive, runs / "live", live_tokens, prior_set]:
        if path.name != "young":
            _age(path, 3)
    (tokens / ".busy.lock").touch()
    dead_locks = [runs / ".killed.lock", tokens / ".0123abcd.lock", tokens / ".damaged.lock"]
    for lock in dead_locks:  # as the killed writers left them
        lock.touch()
    live_locks = [runs / ".busy.lock", runs / ".live.lock", tokens / ".busy.lock", tokens / f".{live_tokens.name}.lock"]
    everything = sorted(str(p) for p in root.rglob("*") if not p.name.endswith(".lock"))

    with run_lock(runs / "busy"), _lock(tokens / ".busy.lock") as held:
        assert held
        assert cli.main(["cache", "gc", "--dry-run", f"--set=storage_root={root}"]) == 0
        listed = capsys.readouterr().out
        assert sorted(str(p) for p in root.rglob("*") if not p.name.endswith(".lock")) == everything  # nothing went
        named = {
            line.split(" | ")[0].strip("| ") for line in listed.splitlines() if line.startswith("| ") and "/" in line
        }
        assert named == {os.path.relpath(p, root) for p in dead}, listed
        assert f"{len(dead)} entries" in listed and "to free" in listed

        assert cli.main(["cache", "gc", f"--set=storage_root={root}"]) == 0
        assert "freed" in capsys.readouterr().out
    assert [p for p in dead if p.exists()] == []
    assert [p for p in alive if not p.exists()] == []
    assert [p for p in dead_locks if p.exists()] == []  # a removed entry's lock file goes with it
    assert [p for p in live_locks if not p.exists()] == []
    assert (runs / "live" / "final" / "config.json").exists() and (prior_set / "_SUCCESS").exists()
    assert (live_tokens / "meta.json").exists()

    # what stayed still works: the live run's data is not tokenised again
    _train(tiny_build, root, "again")
    assert sorted(p.name for p in tokens.iterdir() if p.is_dir() and not p.name.startswith(".")) == sorted(
        [live_tokens.name, "busy"]
    )


def test_gc_keeps_young_entries_and_refuses_an_object_store(tmp_path, capsys):
    root = tmp_path / "root"
    (root / "runs" / "fresh").mkdir(parents=True)
    (root / "runs" / "fresh" / "run.json").write_text("{}")  # a run of ours, never finished
    assert cli.main(["cache", "gc", f"--set=storage_root={root}"]) == 0
    assert (root / "runs" / "fresh").exists() and "0 entries" in capsys.readouterr().out
    assert cli.main(["cache", "gc", "--min-age", "0", f"--set=storage_root={root}"]) == 0
    assert not (root / "runs" / "fresh").exists()
    assert cli.main(["cache", "gc", "--min-age", "-1", f"--set=storage_root={root}"]) == 2
    assert cli.main(["cache", "gc", "--set=storage_root=s3://bucket/x"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 2 and "--min-age -1" in err and "is an object store" in err


def test_gc_never_touches_what_is_not_its_own(tiny_build, tmp_path, capsys, monkeypatch):
    """A folder under runs/ without our run.json (notes, TensorBoard's runs/<date>_<host>/ when the root
    is the working folder), a runs/ that is a symlink out of the root, and a tokenisation entry a
    process is using before any run.json or key.json names it: all stay, however old."""
    root = tmp_path / "root"
    runs = root / "runs"
    notes = runs / "my-notes"
    board = runs / "Dec07_05-31-12_host"
    for folder in (notes, board):
        folder.mkdir(parents=True)
    (notes / "ideas.md").write_text("keep me")
    (board / "events.out.tfevents.1.host").write_bytes(b"x")
    # a tokenisation entry in use by this process (sources.prepare holds its lock shared), named by nothing
    from pipeline.common.config import load_config
    from pipeline.common.models import load_tokenizer
    from pipeline.data import sources
    from pipeline.entry.config import RunConfig

    cfg = load_config(RunConfig, None, tiny_args(tiny_build, root))
    sources.prepare(cfg.data, tiny_build.sft_train, load_tokenizer(tiny_build.model, False), root / "tokens")
    (live,) = [p for p in (root / "tokens").iterdir() if p.is_dir()]
    # somewhere else, reached through a symlinked runs/ of a second root
    outside = tmp_path / "elsewhere"
    (outside / "unfinished").mkdir(parents=True)
    (outside / "unfinished" / "run.json").write_text("{}")
    other = tmp_path / "other-root"
    other.mkdir()
    (other / "runs").symlink_to(outside)
    for path in (notes, board, live, outside / "unfinished"):
        _age(path, 30)
    for where in (root, other):
        assert cli.main(["cache", "gc", "--min-age", "0", f"--set=storage_root={where}"]) == 0
        assert "0 entries" in capsys.readouterr().out
    assert (notes / "ideas.md").read_text() == "keep me" and (board / "events.out.tfevents.1.host").exists()
    assert (live / "meta.json").exists() and (outside / "unfinished" / "run.json").exists()
    # the same entry, once no process uses it, is collected
    from pipeline.data import tokens

    tokens._HELD.pop(live).close()
    assert cli.main(["cache", "gc", "--min-age", "0", f"--set=storage_root={root}"]) == 0
    assert not live.exists() and "1 entries" in capsys.readouterr().out


def test_a_run_gc_cannot_remove_is_named_and_gc_goes_on(tmp_path, capsys, monkeypatch):
    """What the filesystem refuses (this suite runs as root, which no permission stops, so the refusal
    is injected into shutil.rmtree) is one named line; the other dead runs go, and the refused one is
    left as a temporary, never as half a run."""
    root = tmp_path / "root"
    for name in ("a-stuck", "b-gone"):
        (root / "runs" / name / "checkpoints").mkdir(parents=True)
        (root / "runs" / name / "run.json").write_text("{}")
        _age(root / "runs" / name, 3)
    real_rmtree = shutil.rmtree

    def refuse_one(path, *args, **kwargs):
        if "a-stuck" in str(path):
            raise PermissionError(13, "Permission denied", str(Path(path) / "checkpoints"))
        return real_rmtree(path, *args, **kwargs)

    monkeypatch.setattr(shutil, "rmtree", refuse_one)
    assert cli.main(["cache", "gc", f"--set=storage_root={root}"]) == 1
    out = capsys.readouterr().out
    assert "could not remove" in out and "Permission denied" in out and "a-stuck" in out
    assert not (root / "runs" / "b-gone").exists() and not (root / "runs" / "a-stuck").exists()
    assert [p.name.startswith(".a-stuck.tmp-gc") for p in (root / "runs").iterdir() if p.is_dir()] == [True]


def test_a_lock_taken_on_a_file_gc_unlinked_meanwhile_is_taken_again_on_the_current_file(tmp_path):
    """gc unlinks a removed entry's lock file while holding it; a process that opened the file before
    that and was waiting must not end up "holding" an unlinked file beside a newcomer holding the new
    one (storage.lock_file)."""
    import threading

    from pipeline.common.storage import lock_file

    path = tmp_path / ".entry.lock"
    gc_hold = lock_file(path)
    assert gc_hold is not None
    got = []
    waiter = threading.Thread(target=lambda: got.append(lock_file(path, shared=True)))
    waiter.start()
    time.sleep(0.3)  # the waiter has opened the old file and waits on it
    path.unlink()
    gc_hold.close()
    waiter.join(timeout=10)
    (handle,) = got
    assert handle is not None and os.fstat(handle.fileno()).st_ino == os.stat(path).st_ino
    assert lock_file(path, wait=False) is None  # the current file is the one held: a newcomer waits
    handle.close()
