"""Live tracking of every trial, read back from each tracker's own files: TensorBoard's
events, a local MLflow file store, an offline W&B run."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from lrsweep.sweep.collect import load_results
from lrsweep.sweep.plan import execute, prepare_sweep
from tests.conftest import tiny_config


FIXED = "search.peak_lr=[1e-3, 3e-2]"


def test_tensorboard_logs_every_trial_while_it_runs(tmp_path: Path) -> None:
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = tiny_config(FIXED, "sweep.report_to=['tensorboard']", "sweep.pruner=none")
    study = execute(prepare_sweep(cfg, tmp_path, trials=2, progress=False), progress=False)
    _, curves, _ = load_results(tmp_path)
    for t in study.trials:
        events = EventAccumulator(str(tmp_path / "tensorboard" / f"trial-{t.number}"))
        events.Reload()
        mine = curves[curves["number"] == t.number]
        loss = [e.value for e in events.Scalars("train/loss")]
        assert loss == pytest.approx(mine["loss"].tolist(), rel=1e-6)
        assert [e.step for e in events.Scalars("train/learning_rate")] == mine["step"].tolist()
        evals = mine[mine["eval_loss"].notna()]
        got = events.Scalars("eval/loss")
        assert [e.step for e in got] == evals["step"].tolist()
        assert [e.value for e in got] == pytest.approx(evals["eval_loss"].tolist(), rel=1e-6)
        assert "params" in "".join(events.Tags()["tensors"])


def test_mlflow_logs_one_run_per_trial_in_the_user_s_experiment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("mlflow")
    import mlflow
    from mlflow.tracking import MlflowClient

    uri = (tmp_path / "mlruns").as_uri()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # mlflow 3.x: the file store is opt-in
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "my-finetunes")
    cfg = tiny_config(FIXED, "sweep.report_to=['mlflow']", "sweep.pruner=none")
    study = execute(prepare_sweep(cfg, tmp_path, trials=2, progress=False), progress=False)
    _, curves, _ = load_results(tmp_path)
    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("my-finetunes")
    assert experiment is not None
    runs = {r.info.run_name: r for r in client.search_runs([experiment.experiment_id])}
    assert set(runs) == {f"trial-{t.number}" for t in study.trials}
    for t in study.trials:
        run = runs[f"trial-{t.number}"]
        assert run.info.status == "FINISHED" and run.data.tags["lrsweep.study"] == "lrsweep"
        assert float(run.data.params["peak_lr"]) == t.params["peak_lr"]
        mine = curves[curves["number"] == t.number]
        lrs = client.get_metric_history(run.info.run_id, "train/learning_rate")
        assert [m.step for m in lrs] == mine["step"].tolist()
        assert [m.value for m in lrs] == pytest.approx(mine["lr"].tolist())
        evals = client.get_metric_history(run.info.run_id, "eval/loss")
        assert len(evals) == mine["eval_loss"].notna().sum() > 0
    mlflow.set_tracking_uri(None)


def _wandb_records(run_file: Path) -> list[Any]:
    """The protobuf records of an offline W&B run file (LevelDB's log format: 32 KiB blocks
    of CRC + length + type chunks after a 7-byte header)."""
    import struct

    from wandb.proto import wandb_internal_pb2 as pb

    data, pos, buf, records = run_file.read_bytes(), 7, b"", []
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:  # a block's tail too short for a chunk header is padding
            pos += 32768 - pos % 32768
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        buf += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # a full record, or the last chunk of one
            record = pb.Record()
            record.ParseFromString(buf)
            records.append(record)
            buf = b""
    return records


def test_wandb_logs_one_run_per_trial_grouped_under_the_study(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    cfg = tiny_config(
        FIXED, "sweep.report_to=['wandb']", "sweep.pruner=none", "sweep.project=my-project"
    )
    study = execute(prepare_sweep(cfg, tmp_path, trials=2, progress=False), progress=False)
    _, curves, _ = load_results(tmp_path)
    seen = {}
    for run_file in (tmp_path / "wandb").glob("offline-run-*/run-*.wandb"):
        records = _wandb_records(run_file)
        (run,) = [r.run for r in records if r.WhichOneof("record_type") == "run"]
        history = [
            # "train/loss" is stored as the nested key ["train", "loss"]
            {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item}
            for r in records
            if r.WhichOneof("record_type") == "history"
        ]
        seen[run.display_name] = (run.project, run.run_group, history)
    assert set(seen) == {f"trial-{t.number}" for t in study.trials}
    for t in study.trials:
        project, group, history = seen[f"trial-{t.number}"]
        assert (project, group) == ("my-project", "lrsweep")
        mine = curves[curves["number"] == t.number]
        assert [h["_step"] for h in history] == mine["step"].tolist()
        lrs = [h["train/learning_rate"] for h in history]
        assert lrs == pytest.approx(mine["lr"].tolist())
        assert sum("eval/loss" in h for h in history) == mine["eval_loss"].notna().sum() > 0
