"""Result files: parquet with lrsweep's metadata, JSON, all written atomically.

Every file is written to a temporary name in the same folder and then renamed over the
target, so that a crash at any moment leaves either the old file or the new one.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq


META_KEY = b"lrsweep"


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Call ``write(tmp)`` then rename ``tmp`` over ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    os.chmod(tmp, 0o644)  # mkstemp makes it private; results are for everyone to read
    try:
        write(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_parquet(frame: pd.DataFrame, path: Path, metadata: dict[str, Any]) -> None:
    """Write ``frame`` with ``metadata`` (JSON) under the ``lrsweep`` key of the schema."""
    table = pa.Table.from_pandas(frame, preserve_index=False)
    meta = dict(table.schema.metadata or {})
    meta[META_KEY] = json.dumps(metadata, sort_keys=True).encode()
    table = table.replace_schema_metadata(meta)
    atomic_write(path, lambda tmp: pq.write_table(table, tmp))


def read_parquet(path: Path) -> tuple[pd.DataFrame, dict[str, Any]]:
    """The frame and lrsweep's metadata of a file written by :func:`write_parquet`."""
    table = pq.read_table(path)
    raw = (table.schema.metadata or {}).get(META_KEY, b"{}")
    return table.to_pandas(), json.loads(raw)


def write_json(data: Any, path: Path) -> None:
    text = json.dumps(data, indent=2, sort_keys=True) + "\n"
    atomic_write(path, lambda tmp: tmp.write_text(text))


# ---------------------------------------------------------------- sweep results

TRIALS_FILE = "trials.parquet"
CURVES_FILE = "curves.parquet"

TRIAL_COLUMNS = {
    "number": "trial number in the study",
    "state": "COMPLETE, PRUNED, FAIL or RUNNING",
    "peak_lr": "peak learning rate",
    "warmup_fraction": "sampled warmup fraction of total_steps",
    "warmup_steps": "ceil(warmup_fraction * total_steps), as TrainingArguments computes it",
    "min_lr_ratio": "min_lr / peak_lr",
    "min_lr": "the floor of the cosine decay",
    "total_steps": "optimizer steps of the trial",
    "eval_loss": "objective: eval loss after the last step (null unless COMPLETE)",
    "best_eval_loss": "lowest eval loss seen during the trial",
    "best_step": "step of best_eval_loss (0-based optimizer step after which it was measured)",
    "tokens": "tokens trained on",
    "seconds": "wall time of the trial",
    "peak_memory_mb": "peak CUDA memory allocated, or the process RSS on CPU",
    "reason": "why the trial was pruned or failed",
    "seed": "seed of the adapter init and data order",
    "worker": "host:pid that ran it",
}
CURVE_COLUMNS = {
    "number": "trial number",
    "step": "optimizer step (0-based)",
    "lr": "learning rate used by that step's update",
    "loss": "training loss of that step (token-weighted over grad_accum)",
    "eval_loss": "eval loss measured after that step, null where not evaluated",
}


def _attr(trial: Any, key: str) -> Any:
    return trial.user_attrs.get(key)


def trials_frame(trials: list[Any]) -> pd.DataFrame:
    """One row per trial (Optuna FrozenTrials), in the schema of ``TRIAL_COLUMNS``."""
    rows = []
    for t in trials:
        attrs = t.user_attrs
        rows.append(
            {
                "number": t.number,
                "state": t.state.name,
                "peak_lr": t.params.get("peak_lr"),
                "warmup_fraction": t.params.get("warmup_fraction"),
                "warmup_steps": attrs.get("warmup_steps"),
                "min_lr_ratio": attrs.get("min_lr_ratio", t.params.get("min_lr_ratio")),
                "min_lr": attrs.get("min_lr"),
                "total_steps": attrs.get("total_steps"),
                "eval_loss": t.value if t.state.name == "COMPLETE" else None,
                "best_eval_loss": attrs.get("best_eval_loss"),
                "best_step": attrs.get("best_step"),
                "tokens": attrs.get("tokens"),
                "seconds": attrs.get("seconds"),
                "peak_memory_mb": attrs.get("peak_memory_mb"),
                "reason": attrs.get("reason"),
                "seed": attrs.get("seed"),
                "worker": attrs.get("worker"),
            }
        )
    frame = pd.DataFrame(rows, columns=list(TRIAL_COLUMNS))
    types = {
        "number": "int64",
        "warmup_steps": "Int64",
        "total_steps": "Int64",
        "best_step": "Int64",
        "tokens": "Int64",
        "seed": "Int64",
    }
    float_cols = [
        c for c in TRIAL_COLUMNS if c not in types and c not in ("state", "reason", "worker")
    ]
    frame = frame.astype(types | {c: "float64" for c in float_cols})
    return frame.astype({"state": "string", "reason": "string", "worker": "string"})


def curves_frame(trials: list[Any]) -> pd.DataFrame:
    """One row per trial per optimizer step, in the schema of ``CURVE_COLUMNS``."""
    parts = []
    for t in trials:
        curve = t.user_attrs.get("curve")
        if not curve or not curve["lr"]:
            continue
        n = len(curve["lr"])
        parts.append(
            pd.DataFrame(
                {
                    "number": [t.number] * n,
                    "step": range(n),
                    "lr": curve["lr"],
                    "loss": curve["loss"],
                    "eval_loss": [math.nan if v is None else v for v in curve["eval_loss"]],
                }
            )
        )
    if not parts:
        return pd.DataFrame({c: pd.Series(dtype="float64") for c in CURVE_COLUMNS}).astype(
            {"number": "int64", "step": "int64"}
        )
    return pd.concat(parts, ignore_index=True).astype({"number": "int64", "step": "int64"})


def write_sweep_results(trials: list[Any], out: Path, metadata: dict[str, Any]) -> None:
    """Rewrite trials.parquet and curves.parquet (atomically) from the study's trials."""
    # Curves first: a reader that finds trials.parquet up to date may trust curves.parquet.
    write_parquet(curves_frame(trials), out / CURVES_FILE, {**metadata, "columns": CURVE_COLUMNS})
    write_parquet(trials_frame(trials), out / TRIALS_FILE, {**metadata, "columns": TRIAL_COLUMNS})
