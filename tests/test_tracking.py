"""`train.report_to`: TensorBoard and MLflow (local file store, offline) read back and compared with
metrics.jsonl; the final eval report lands in the same tracker run; reruns reuse a finished eval."""

from __future__ import annotations

import json
import os

import pytest

from pipeline.common.config import load_config
from pipeline.common.errors import TrackingError
from pipeline.entry import stages
from pipeline.entry.config import RunConfig
from tests.conftest import REPO, tiny_args


def _cfg(build, storage, *extra):
    eval_set = json.dumps([{"name": "arith", "path": str(build.sft_heldout), "answer_type": "numeric", "limit": 4}])
    return load_config(
        RunConfig,
        None,
        tiny_args(
            build,
            storage,
            "train.batch_size=4",
            "train.micro_batch_size=4",
            "train.max_steps=3",
            "train.eval_every=0",
            "train.threads=1",
            "train.name=tracked",
            f"eval.sets={eval_set}",
            "eval.engine=hf",
            "eval.n=2",
            "eval.max_new_tokens=8",
            *extra,
        ),
    )


@pytest.fixture
def mlflow_store(tmp_path, monkeypatch):
    uri = (tmp_path / "mlruns").as_uri()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 keeps the file store behind an opt-in
    return uri


def test_tensorboard_and_mlflow_get_every_metric_config_and_eval_report(tiny_build, tmp_path, mlflow_store):
    from mlflow import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = _cfg(tiny_build, tmp_path, "train.report_to=[tensorboard, mlflow]")
    final = stages.train(cfg, progress=False)
    report = json.loads(stages.evaluate_run(cfg, progress=False).read_text())
    metrics = [json.loads(line) for line in (final.parent / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2, 3]

    events = EventAccumulator(str(final.parent / "tensorboard")).Reload()
    for key in ("loss", "lr", "grad_norm", "ce", "tokens_per_s"):
        logged = [(e.step, e.value) for e in events.Scalars(f"train/{key}")]
        assert logged == [(m["step"], pytest.approx(m[key], rel=1e-6)) for m in metrics], key
    greedy = events.Scalars("eval/overall/greedy")
    assert [(e.step, e.value) for e in greedy] == [(3, pytest.approx(report["overall"]["greedy"]))]
    assert "config" in events.Tags()["tensors"] or "config/text_summary" in events.Tags()["tensors"]

    assert stages.evaluate_run(cfg, progress=False).exists()  # reused: logged once, not again
    run_id = json.loads((final.parent / "tracking.json").read_text())["mlflow"]
    client = MlflowClient(mlflow_store)
    assert len(client.get_metric_history(run_id, "eval/overall/greedy")) == 1
    history = client.get_metric_history(run_id, "loss")
    assert [(h.step, h.value) for h in history] == [(m["step"], pytest.approx(m["loss"])) for m in metrics]
    run = client.get_run(run_id)
    assert run.data.params["train/lr"] == str(cfg.train.lr) and run.data.params["train/name"] == "tracked"
    assert run.data.metrics["eval/overall/average_at_n"] == pytest.approx(report["overall"]["average_at_n"])


def test_a_missing_tracker_package_is_one_clear_error(tiny_build, tmp_path, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_wandb(name, *args, **kwargs):
        if name == "wandb":
            raise ImportError("No module named 'wandb'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_wandb)
    message = r"names 'wandb' but it is not installed; `pip install target-sft\[wandb\]`"
    with pytest.raises(TrackingError, match=message):
        stages.train(_cfg(tiny_build, tmp_path, "train.report_to=[wandb]"), progress=False)


def test_wandb_offline_run_gets_the_metrics(tiny_build, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    final = stages.train(_cfg(tiny_build, tmp_path, "train.report_to=[wandb]"), progress=False)
    run_id = json.loads((final.parent / "tracking.json").read_text())["wandb"]
    offline = list((final.parent / "wandb").glob(f"offline-run-*-{run_id}"))
    assert len(offline) == 1, os.listdir(final.parent / "wandb")
    metrics = [json.loads(line) for line in (final.parent / "metrics.jsonl").read_text().splitlines()]
    history = _wandb_history(next(offline[0].glob("run-*.wandb")))
    assert history == [(m["step"], pytest.approx(m["loss"])) for m in metrics]


def _wandb_history(path) -> list[tuple[int, float]]:
    """(step, loss) of the history records in a W&B offline datastore (the file `wandb sync` uploads).

    The file is a LevelDB-style log: a 7-byte header (`:W&B`, magic, version), then 32 KiB blocks of
    records, each with a 7-byte header (crc32, length, type: 1 full, 2 first, 3 middle, 4 last)."""
    import struct

    from wandb.proto import wandb_internal_pb2

    raw, block, offset, pending, records = path.read_bytes(), 32768, 7, b"", []
    assert raw[:4] == b":W&B"
    while offset + 7 <= len(raw):
        if block - offset % block < 7:  # too little room left for a header: the block is padded
            offset += block - offset % block
            continue
        _, length, kind = struct.unpack("<IHB", raw[offset : offset + 7])
        if kind == 0:
            break
        pending += raw[offset + 7 : offset + 7 + length]
        offset += 7 + length
        if kind in (1, 4):
            records.append(pending)
            pending = b""
    history = []
    for data in records:
        record = wandb_internal_pb2.Record()
        record.ParseFromString(data)
        if record.WhichOneof("record_type") == "history":
            items = {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
            history.append((record.history.step.num, items["train/loss"]))
    return history


def test_rerun_reuses_an_unchanged_evaluation_and_redoes_a_changed_one(tiny_build, tmp_path):
    cfg = _cfg(tiny_build, tmp_path)
    stages.train(cfg, progress=False)
    first = stages.evaluate_run(cfg, progress=False)
    samples = first.parent / "samples.jsonl"
    stamp = samples.stat().st_mtime_ns
    again = stages.evaluate_run(cfg, progress=False)
    assert again == first and samples.stat().st_mtime_ns == stamp  # nothing generated again
    changed = _cfg(tiny_build, tmp_path, "eval.n=3")
    report = json.loads(stages.evaluate_run(changed, progress=False).read_text())
    assert report["n"] == 3 and samples.stat().st_mtime_ns != stamp


@pytest.mark.parametrize(
    "tracker,env,phrase",
    [
        (
            "mlflow",
            {"MLFLOW_TRACKING_URI": "file:///etc/hostname/mlruns", "MLFLOW_ALLOW_FILE_STORE": "true"},
            "MLflow could not start",
        ),
        ("wandb", {"WANDB_MODE": "online", "WANDB_API_KEY": None}, "W&B could not start"),
    ],
)
def test_a_tracker_that_cannot_start_is_one_line_and_leaves_no_run_folder(
    tiny_build, tmp_path, monkeypatch, capsys, tracker, env, phrase
):
    """MLflow with a store it refuses, W&B with no API key: were tracebacks, and a rerun needed --resume."""
    from pipeline.entry import cli

    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # no ~/.netrc, no W&B settings
    for name, value in env.items():
        monkeypatch.delenv(name, raising=False) if value is None else monkeypatch.setenv(name, value)
    if tracker == "wandb":  # an earlier test's offline settings live in W&B's process-wide singleton
        import wandb

        wandb.teardown()
    sets = [f"--set={s}" for s in tiny_args(tiny_build, tmp_path / "root", "train.name=r", "train.max_steps=1",
            "train.batch_size=4", "train.micro_batch_size=4", "train.target=sft", "data.limit=8")]  # fmt: skip
    demo = str(REPO / "configs" / "worlds" / "model-strong.yaml")
    code = cli.main(["train", demo, *sets, f"--set=train.report_to=[{tracker}]"])
    err = capsys.readouterr().err
    assert (code, phrase in err, err.count("error:"), "Traceback" in err) == (2, True, 1, False), err
    assert not (tmp_path / "root" / "runs" / "r").exists()
    assert cli.main(["train", demo, *sets]) == 0  # the same name starts fresh: no --resume needed
