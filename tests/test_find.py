from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

import lrsweep
from lrsweep.config import RangeTestConfig
from lrsweep.find import load_find
from lrsweep.horizon import PROBE_HELD_OUT, carry, how_sure, known_data, lowest_factor
from lrsweep.results import read_parquet
from lrsweep.suggest import suggest_probe
from tests.conftest import ROOT, run_cli, tiny_config


def test_find_lr_writes_the_three_files(tmp_path: Path) -> None:
    result = lrsweep.find_lr(
        ROOT / "studies" / "tiny.toml",
        overrides=["rangetest.steps=20", "rangetest.mode=ramp"],
        out=tmp_path,
        progress=False,
    )
    frame, meta = read_parquet(tmp_path / "rangetest.parquet")
    assert frame.columns.tolist() == [
        "step",
        "lr",
        "loss",
        "smoothed_loss",
        "train_loss",
        "tokens",
        "seconds",
    ]
    assert len(frame) == 20 and frame["step"].tolist() == list(range(20))
    assert frame["lr"].is_monotonic_increasing and frame["tokens"].is_monotonic_increasing
    assert meta["config"]["rangetest"]["steps"] == 20
    assert meta["suggestion"] == result.suggestion.to_dict()
    saved = json.loads((tmp_path / "suggestion.json").read_text())
    assert set(saved) >= {"recommended_lr", "interval", "divergence_lr", "methods"}
    assert set(saved["methods"]) == {"valley", "steep", "minimum", "slide"}
    assert saved["recommended_lr"] == result.recommended_lr
    png = (tmp_path / "rangetest.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    pd.testing.assert_frame_equal(frame, result.curve.frame())


def test_find_lr_is_reproducible() -> None:
    a = lrsweep.find_lr(tiny_config("rangetest.runs=4"), progress=False)
    b = lrsweep.find_lr(tiny_config(), overrides=["rangetest.runs=4"], progress=False)
    assert a.curve.losses == b.curve.losses


def test_cli_find_prints_the_suggestion_and_a_snippet(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    code, out, err = run_cli(
        capsys,
        monkeypatch,
        "find",
        str(ROOT / "studies" / "tiny.toml"),
        "--set",
        "rangetest.runs=4",
        "--out",
        str(tmp_path / "f"),
        "-q",
    )
    assert code == 0, err
    assert "Recommended peak LR" in out and "probe" in out  # the default mode
    assert "TrainingArguments(" in out and 'lr_scheduler_type="cosine_with_min_lr"' in out
    assert (tmp_path / "f" / "suggestion.json").exists()


def test_cli_find_probe_mode_writes_one_point_per_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    out_dir = tmp_path / "p"
    args = ["find", str(ROOT / "studies" / "tiny.toml"), "--out", str(out_dir), "-q"]
    code, out, err = run_cli(capsys, monkeypatch, *args, "--mode", "probe")
    assert code == 0, err
    assert "probe runs" in out and "Recommended peak LR" in out
    frame, meta = read_parquet(out_dir / "rangetest.parquet")
    assert meta["config"]["rangetest"]["mode"] == "probe"
    assert 3 <= len(frame) <= 9 and frame["lr"].is_monotonic_increasing
    assert meta["start_loss"] > frame["loss"].min()
    # Runs of the default rangetest.run_steps, each scored once at its end.
    assert all(len(losses) == 1 for losses in frame["run_losses"])
    found = load_find(out_dir)
    assert found is not None and found.curve.mode == "probe"
    assert found.curve.optimizer_steps == RangeTestConfig().run_steps * len(frame)
    assert found.curve.start_loss is not None
    suggested = suggest_probe(found.curve.lrs, found.curve.losses, found.curve.start_loss)
    # Saved as carried to the run it is for (the caveats of lrsweep.horizon added).
    assert found.suggestion == carry(suggested, found.for_run()["steps"], found.curve.best_drop)
    # Carried from the curve each time: carrying the saved result again changes nothing.
    assert found.carried() == found and found.carried().carried() == found
    code, _, err = run_cli(capsys, monkeypatch, *args, "--set", "rangetest.runs=2")
    assert code == 2 and err == "error: rangetest.runs: must be at least 3, got 2\n"


def test_probe_over_seeds_repeats_it_with_the_next_seeds_and_means_them(tmp_path: Path) -> None:
    one = lrsweep.find_lr(tiny_config("rangetest.runs=4"), progress=False)
    both = lrsweep.find_lr(
        tiny_config("rangetest.runs=4", "rangetest.seeds=2"), out=tmp_path, progress=False
    )
    seed_losses = both.curve.seed_losses
    assert seed_losses is not None and set(both.curve.lrs) <= set(one.curve.lrs)
    # The first seed is the study's own probe; the second a fresh adapter and batch order.
    own = dict(zip(one.curve.lrs, one.curve.losses, strict=True))
    assert [a for a, _ in seed_losses] == [own[lr] for lr in both.curve.lrs]
    assert all(a != b for a, b in seed_losses)
    assert both.curve.losses == pytest.approx([(a + b) / 2 for a, b in seed_losses])
    # Each seed's own runs count, also those the other seed did not run.
    assert both.curve.optimizer_steps >= 2 * len(seed_losses) * RangeTestConfig().run_steps
    assert both.curve.tokens == sorted(both.curve.tokens)
    assert set(both.suggestion.methods) >= {"seed 0", "seed 1"}
    found = load_find(tmp_path)
    assert found is not None and found.curve.seed_losses == seed_losses
    assert found.suggestion == both.suggestion


def test_find_says_which_run_the_number_is_for(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A planned run ten times the calibration length keeps the number and reaches lower."""
    out_dir = tmp_path / "f"
    args = ["find", str(ROOT / "studies" / "tiny.toml"), "--out", str(out_dir), "-q"]
    code, out, err = run_cli(capsys, monkeypatch, *args, "--set", "planned.epochs=2")
    assert code == 0, err
    found = load_find(out_dir)
    assert found is not None and found.curve.start_loss is not None
    run = found.for_run()
    assert run["steps"] == math.ceil(2 * found.train_sequences / 4) and run["epochs"] == 2
    assert f"For a run of 2 epochs ({run['steps']} steps)" in out and "study's planned run" in out
    assert "100-step warmup + cosine fine-tune" in out
    assert how_sure("probe") in out
    probe = suggest_probe(found.curve.lrs, found.curve.losses, found.curve.start_loss)
    assert found.suggestion == carry(probe, run["steps"], found.curve.best_drop)
    saved = json.loads((out_dir / "suggestion.json").read_text())
    assert (
        saved["for_run"]["steps"] == run["steps"] and saved["for_run"]["calibrated_steps"] == 100
    )
    assert saved["interval"] == list(found.suggestion.interval or ())
    # The bounds hf.sweep takes: as lrsweep sweep sets them, numbers also without divergence.
    low, high = found.sweep_bounds()
    assert found.recommended_lr is not None
    below = PROBE_HELD_OUT if known_data(found.curve.best_drop) else 10  # the tiny model's is
    assert low == pytest.approx(found.recommended_lr / below * lowest_factor(run["steps"]))
    assert high == max(found.suggestion.divergence_lr or max(found.curve.lrs), 10 * low)


def test_bad_data_path_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    code, _, err = run_cli(
        capsys,
        monkeypatch,
        "find",
        str(ROOT / "studies" / "tiny.toml"),
        "--set",
        f"data.path={tmp_path / 'nope.jsonl'}",
        "--out",
        str(tmp_path / "f"),
    )
    assert code == 2 and err.startswith("error: data.path:") and err.count("\n") == 1
    assert not (tmp_path / "f").exists()


def test_python_dash_m_help() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "lrsweep", "find", "--help"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        check=True,
    )
    assert "Run the LR range test" in done.stdout and "--set" in done.stdout


def test_an_out_folder_that_cannot_be_written_is_refused_before_the_range_test(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        args = ["find", str(ROOT / "studies" / "tiny.toml"), "--out", str(locked / "f"), "-q"]
        code, out, err = run_cli(capsys, monkeypatch, *args)
    finally:
        locked.chmod(0o755)
    assert code == 2 and "is not writable" in err and err.count("\n") == 1, err
    assert "Range test" not in out
