"""The real pretrained model: the bundled SmolLM2-135M-Instruct, a few steps."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import lrsweep
from lrsweep.results import read_parquet
from tests.conftest import ROOT


pytestmark = pytest.mark.slow


def test_find_on_the_bundled_model(tmp_path: Path) -> None:
    result = lrsweep.find_lr(
        ROOT / "studies" / "default.toml",
        overrides=[
            "rangetest.steps=12",
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
    assert len(frame) == 12 and meta["config"]["model"]["path"] == "bundled"
    # A pretrained model on Python code: far below the loss of a uniform guess (ln 49152).
    assert frame["loss"].iloc[0] < 4.0
    assert set(json.loads((tmp_path / "suggestion.json").read_text())["methods"]) == {
        "valley",
        "steep",
        "minimum",
        "slide",
    }
    assert result.curve.seconds_per_step > 0
