"""The real pretrained model: the bundled SmolLM2-135M-Instruct, a few steps."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import lrsweep
from lrsweep.results import read_parquet
from tests.conftest import ROOT


pytestmark = pytest.mark.slow


@pytest.mark.parametrize("mode", ["probe", "ramp"])
def test_find_on_the_bundled_model(tmp_path: Path, mode: str) -> None:
    result = lrsweep.find_lr(
        ROOT / "studies" / "default.toml",
        overrides=[
            f"rangetest.mode={mode}",
            "rangetest.steps=12" if mode == "ramp" else "rangetest.runs=4",
            "rangetest.start_lr=1e-5",
            "rangetest.end_lr=1e-2",
            "data.max_tokens=30000",
            "data.eval_blocks=4",
            "train.batch_size=2",
            "train.seq_len=64",
        ],
        out=tmp_path,
        progress=False,
    )
    frame, meta = read_parquet(tmp_path / "rangetest.parquet")
    assert meta["config"]["model"]["path"] == "bundled"
    # A pretrained model on Python code: far below the loss of a uniform guess (ln 49152).
    assert frame["loss"].iloc[0] < 4.0
    methods = set(json.loads((tmp_path / "suggestion.json").read_text())["methods"])
    if mode == "ramp":
        assert len(frame) == 12 and methods == {"valley", "steep", "minimum", "slide"}
    else:
        # 4 runs at 1e-5 .. 1e-2: 1e-3 lowers the held-out loss of the pretrained model
        # within a run, so there is a recommendation.
        assert 3 <= len(frame) <= 4 and methods == {"probe", "best run"}
        assert result.recommended_lr is not None and 1e-5 <= result.recommended_lr <= 1e-2
    assert result.curve.seconds_per_step > 0
