"""Result files: every file name lrsweep writes, and their writers, readers and merges.

Every file is written to a temporary name in the same folder and then renamed over the
target, so that a crash at any moment leaves either the old file or the new one. No writer
replaces a sweep's result files with ones that hold fewer trials: a process that cannot see
every trial (a worker's part, a storage that lags) leaves the files alone and says so.

This module imports pandas and pyarrow only: ``lrsweep report`` and ``export`` read the
files without torch, transformers or peft.
"""

from __future__ import annotations

import fcntl
import json
import logging
import math
import os
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from lrsweep.errors import StudyError, first_line
from lrsweep.record import TrialRecord


logger = logging.getLogger(__name__)

META_KEY = b"lrsweep"

# lrsweep find
RANGETEST_FILE = "rangetest.parquet"
SUGGESTION_FILE = "suggestion.json"
RANGETEST_PLOT = "rangetest.png"
# lrsweep sweep
JOURNAL_FILE = "study.journal"
LIVE_DIR = "live"  # liveness records of a journal's running trials
PARTS_DIR = "parts"  # one folder of result files per worker process
TRIALS_FILE = "trials.parquet"
CURVES_FILE = "curves.parquet"
SWEEP_PLOTS = ("sweep_lr.png", "sweep_top5.png", "sweep_progress.png")
ADAPTERS_DIR = "adapters"  # OUT/adapters/trial-<n>/ (peft save_pretrained + tokenizer)
BEST_ADAPTER = "best"  # OUT/adapters/best: a link to the best trial's folder
ADAPTER_INFO = "lrsweep_adapter.json"  # in each adapter folder: its trial and schedule
TENSORBOARD_DIR = "tensorboard"  # OUT/tensorboard/trial-<n>/: live TensorBoard event files


def adapter_folder(out: Path, number: int) -> Path:
    return out / ADAPTERS_DIR / f"trial-{number}"


def read_adapter_info(folder: Path) -> dict[str, Any] | None:
    """The info file of a saved adapter folder (or link), or None when there is none."""
    path = folder / ADAPTER_INFO
    try:
        return json.loads(path.read_text()) if path.is_file() else None
    except (OSError, ValueError):
        return None


def folder_bytes(folder: Path) -> int:
    """Bytes of the files under ``folder`` (links not followed)."""
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file() and not p.is_symlink())


def size_text(n: int) -> str:
    """``n`` bytes for people: 12 KB, 3.4 MB, 1.2 GB."""
    for unit, scale in (("GB", 2**30), ("MB", 2**20)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n / 2**10:.0f} KB"


def adapters_line(out: Path) -> str | None:
    """Where the kept adapters are and their space on disk, or None when there are none."""
    best = out / ADAPTERS_DIR / BEST_ADAPTER
    info = read_adapter_info(best)
    if info is None:
        return None
    return (
        f"Adapters: {out / ADAPTERS_DIR} ({size_text(folder_bytes(out / ADAPTERS_DIR))}); "
        f"best: trial {info['trial']}, eval loss {info['eval_loss']:.4f} ({best})"
    )


def umask() -> int:
    """The process's umask (read without changing it for longer than the call)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def writable(folder: Path) -> bool:
    """Whether lrsweep may write into ``folder``: this user can, and its mode lets someone
    (a folder made read-only with chmod a-w stays read-only, for root too)."""
    return os.access(folder, os.W_OK) and bool(folder.stat().st_mode & 0o222)


def check_writable(folder: Path, option: str) -> None:
    """Refuse, before any work, a result folder that cannot be written (or made)."""
    existing = next(p for p in (folder, *folder.absolute().parents) if p.exists())
    if not existing.is_dir():
        raise StudyError(f"{option} {folder}: {existing} is a file; choose another folder")
    if not writable(existing):
        raise StudyError(f"{option} {folder}: {existing} is not writable; choose another folder")


@contextmanager
def locked(folder: Path) -> Iterator[None]:
    """``folder``'s exclusive lock among processes (flock on the folder itself: no lock file
    in it), for read-decide-write steps that several workers may take at once."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def atomic_write(path: Path, write: Callable[[Path], object]) -> None:
    """Call ``write(tmp)`` then rename ``tmp`` over ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    # mkstemp makes it private; a result file gets the mode any new file would (the umask).
    os.chmod(tmp, 0o666 & ~umask())
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
    """The frame and lrsweep's metadata of a file written by :func:`write_parquet`; a
    damaged file is a one-line :class:`StudyError`."""
    try:
        table = pq.read_table(path)
        return table.to_pandas(), _schema_meta(table.schema)
    except (pa.ArrowException, OSError, ValueError) as err:
        raise StudyError(f"{path}: damaged or not an lrsweep file ({first_line(err)})") from None


def _schema_meta(schema: pa.Schema) -> dict[str, Any]:
    """lrsweep's metadata in a parquet schema ({} when there is none)."""
    return json.loads((schema.metadata or {}).get(META_KEY, b"{}"))


def write_json(data: Any, path: Path) -> None:
    text = json.dumps(data, indent=2, sort_keys=True) + "\n"
    atomic_write(path, lambda tmp: tmp.write_text(text))


# ---------------------------------------------------------------- range test


def write_find(out: Path, curve: pd.DataFrame, suggestion: dict[str, Any], meta: dict) -> None:
    """rangetest.parquet (the curve, with ``meta``) and suggestion.json."""
    write_parquet(curve, out / RANGETEST_FILE, meta)
    write_json(suggestion, out / SUGGESTION_FILE)


def read_find(out: Path) -> tuple[pd.DataFrame, dict[str, Any]] | None:
    """The saved range test of ``out`` (curve and metadata), or None when there is none."""
    path = out / RANGETEST_FILE
    return read_parquet(path) if path.exists() else None


# ---------------------------------------------------------------- sweep

TRIAL_COLUMNS = {
    "number": "trial number in the study",
    "state": "COMPLETE, PRUNED, FAIL, RUNNING or WAITING (queued, e.g. a retry)",
    "peak_lr": "peak learning rate",
    "warmup_fraction": "sampled warmup fraction of total_steps",
    "warmup_steps": "ceil(warmup_fraction * total_steps), as TrainingArguments computes it",
    "min_lr_ratio": "min_lr / peak_lr",
    "min_lr": "the floor of the decay (0 for linear and constant)",
    "schedule": "decay family: cosine, linear, constant or wsd (transformers' schedulers)",
    "loraplus_lr_ratio": "LoRA+ ratio of the B matrices' LR over the A matrices' (1: plain)",
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
    "confirms": "confirmation run: the number of the trial it repeats with a new seed",
    "origin": "why the trial was queued: range test recommendation, common default, ...",
    "micro_batch_size": "rows per forward pass that ran (smaller than train.batch_size after "
    "an out-of-memory retry)",
    "grad_accum": "micro-batches per optimizer step that ran (micro_batch_size x grad_accum "
    "= train.batch_size x train.grad_accum)",
    "oom_retries": "out-of-memory errors before the shape that ran",
    "dtype": "compute dtype that ran: bfloat16, float16 or float32 (train.dtype auto resolved)",
}
CURVE_COLUMNS = {
    "number": "trial number",
    "step": "optimizer step (0-based)",
    "lr": "learning rate used by that step's update",
    "loss": "training loss of that step (token-weighted over grad_accum)",
    "eval_loss": "eval loss measured after that step, null where not evaluated",
}
_INTS = (
    "warmup_steps",
    "total_steps",
    "best_step",
    "tokens",
    "seed",
    "confirms",
    "micro_batch_size",
    "grad_accum",
    "oom_retries",
)
_STRINGS = ("state", "reason", "worker", "schedule", "origin", "dtype")
# Which copy of a trial is newest when files disagree: a finished state beats a waiting or
# running one (the trial moved on since the other file was written).
_STATE_RANK = {"WAITING": 0, "RUNNING": 1, "FAIL": 2, "PRUNED": 2, "COMPLETE": 2}


def _either(recorded: Any, sampled: Any) -> Any:
    """What a trial ran with (recorded), else what was sampled for it (a trial not run yet)."""
    return recorded if recorded is not None else sampled


def _trial_row(t: Any) -> dict[str, Any]:
    r = TrialRecord.of(t)
    row = {c: getattr(r, c, None) for c in TRIAL_COLUMNS}
    row.update(
        number=t.number,
        state=t.state.name,
        peak_lr=t.params.get("peak_lr"),
        warmup_fraction=t.params.get("warmup_fraction"),
        min_lr_ratio=_either(r.min_lr_ratio, t.params.get("min_lr_ratio")),
        schedule=r.schedule or t.params.get("schedule"),
        loraplus_lr_ratio=_either(r.loraplus_lr_ratio, t.params.get("loraplus_lr_ratio")),
        eval_loss=t.value if t.state.name == "COMPLETE" else None,
    )
    return row


def trials_frame(trials: list[Any]) -> pd.DataFrame:
    """One row per trial (Optuna FrozenTrials), in the schema of ``TRIAL_COLUMNS``."""
    frame = pd.DataFrame([_trial_row(t) for t in trials], columns=list(TRIAL_COLUMNS))
    floats = [c for c in TRIAL_COLUMNS if c not in (*_INTS, *_STRINGS, "number")]
    return frame.astype(
        {"number": "int64"}
        | {c: "Int64" for c in _INTS}
        | {c: "float64" for c in floats}
        | {c: "string" for c in _STRINGS}
    )


def curves_frame(trials: list[Any]) -> pd.DataFrame:
    """One row per trial per optimizer step, in the schema of ``CURVE_COLUMNS``."""
    parts = []
    for t in trials:
        curve = TrialRecord.of(t).curve
        if curve is None or not curve.lr:
            continue
        n = len(curve.lr)
        parts.append(
            pd.DataFrame(
                {
                    "number": [t.number] * n,
                    "step": range(n),
                    "lr": curve.lr,
                    "loss": curve.loss,
                    "eval_loss": [math.nan if v is None else v for v in curve.eval_loss],
                }
            )
        )
    if not parts:
        return pd.DataFrame({c: pd.Series(dtype="float64") for c in CURVE_COLUMNS}).astype(
            {"number": "int64", "step": "int64"}
        )
    return pd.concat(parts, ignore_index=True).astype({"number": "int64", "step": "int64"})


def part_folder(out: Path, worker: str) -> Path:
    """Where the worker ``host:pid`` writes the result files of the trials it ran."""
    return out / PARTS_DIR / worker.replace(":", "-")


def _known_trials(folder: Path) -> set[int]:
    path = folder / TRIALS_FILE
    if not path.exists():
        return set()
    try:
        return set(read_parquet(path)[0]["number"])
    except StudyError:
        return set()  # a damaged file holds nothing worth keeping; it is rebuilt


def write_sweep(trials: list[Any], folder: Path, metadata: dict[str, Any]) -> bool:
    """Rewrite trials.parquet and curves.parquet in ``folder`` (atomically) from ``trials``
    (Optuna FrozenTrials), unless the files there hold a trial that ``trials`` lacks: then
    they are left alone and False returned."""
    missing = _known_trials(folder) - {t.number for t in trials}
    if missing:
        logger.warning(
            "%s holds %d trials that this process cannot see (e.g. %d); left as it is",
            folder / TRIALS_FILE,
            len(missing),
            min(missing),
        )
        return False
    # Curves first: a reader that finds trials.parquet up to date may trust curves.parquet.
    meta = {**metadata, "columns": CURVE_COLUMNS}
    write_parquet(curves_frame(trials), folder / CURVES_FILE, meta)
    write_parquet(
        trials_frame(trials), folder / TRIALS_FILE, {**metadata, "columns": TRIAL_COLUMNS}
    )
    return True


def sweep_states(out: Path, study: str) -> dict[int, str] | None:
    """Trial number -> state in ``out``'s trials.parquet (None when it is missing, damaged,
    holds another study's trials, or its curves.parquet is missing or damaged), to see
    whether the files lag behind the storage."""
    if not (out / CURVES_FILE).exists() or not (out / TRIALS_FILE).exists():
        return None
    try:
        read_parquet(out / CURVES_FILE)
        frame, meta = read_parquet(out / TRIALS_FILE)
    except StudyError:
        return None
    if meta.get("study", study) != study:
        return None
    return dict(zip(frame["number"], frame["state"], strict=True))


def results_study(out: Path) -> str | None:
    """The study whose trials ``out``'s result files (or a worker's part files there) hold,
    if any: their trial numbers, curves and adapters are that study's."""
    for path in [out / TRIALS_FILE, *sorted((out / PARTS_DIR).glob(f"*/{TRIALS_FILE}"))]:
        try:
            meta = _schema_meta(pq.read_schema(path))
        except (pa.ArrowException, OSError, ValueError):
            continue  # missing or damaged: it names no study
        if meta.get("study"):
            return str(meta["study"])
    return None


def merged_parts(out: Path) -> tuple[pd.DataFrame, pd.DataFrame, dict[str, Any]] | None:
    """The workers' part files and ``out``'s own files merged: every trial any of them
    holds, each in its newest state (None when there is nothing to merge). Reads only."""
    sources = [out] + sorted(p.parent for p in (out / PARTS_DIR).glob(f"*/{TRIALS_FILE}"))
    frames, curves, damaged = [], [], []
    meta: dict[str, Any] = {}
    for folder in sources:
        if folder == out and not (out / TRIALS_FILE).exists():
            continue
        try:
            frame, meta_ = read_parquet(folder / TRIALS_FILE)
            curve, _ = read_parquet(folder / CURVES_FILE)
        except StudyError as err:
            logger.warning("skipping %s", err)
            damaged.append(err)
            continue
        frames.append(frame.assign(_rank=frame["state"].map(_STATE_RANK).fillna(0)))
        curves.append(curve)
        meta = meta or meta_
    if not frames:
        if damaged:
            raise StudyError(f"{damaged[0]}; give --storage to rebuild it from the study")
        return None
    merged = pd.concat(frames, ignore_index=True).sort_values("_rank", kind="stable")
    merged = merged.drop_duplicates("number", keep="last").drop(columns="_rank")
    merged = merged.sort_values("number").reset_index(drop=True)
    curve = pd.concat(curves, ignore_index=True).drop_duplicates(["number", "step"], keep="last")
    curve = curve[curve["number"].isin(merged["number"])].sort_values(["number", "step"])
    return merged, curve.reset_index(drop=True), meta


def merge_parts(out: Path) -> bool:
    """Write :func:`merged_parts` into ``out``'s own files; False when there was nothing to
    merge."""
    merged = merged_parts(out)
    if merged is None:
        return False
    trials, curves, meta = merged
    _keeps_own_trials(out, trials)
    write_parquet(curves, out / CURVES_FILE, {**meta, "columns": CURVE_COLUMNS})
    write_parquet(trials, out / TRIALS_FILE, {**meta, "columns": TRIAL_COLUMNS})
    return True


def _keeps_own_trials(out: Path, merged: pd.DataFrame) -> None:
    """Refuse a merge that would replace ``out``'s own trials file with one that holds less:
    :func:`merged_parts` skips ``out``'s files when either cannot be read."""
    if not (out / TRIALS_FILE).exists():
        return
    hint = "give --storage to rebuild the files from the study, or move them aside"
    try:
        own, _ = read_parquet(out / TRIALS_FILE)
    except StudyError as err:
        raise StudyError(f"{err}; {hint}") from None
    if lost := sorted(set(own["number"]) - set(merged["number"])):
        raise StudyError(
            f"{out}: merging the workers' parts would drop trials {lost} of {TRIALS_FILE} "
            f"(its {CURVES_FILE} could not be read); {hint}"
        )


def sweep_frames(
    trials: list[Any], metadata: dict[str, Any]
) -> tuple[pd.DataFrame, pd.DataFrame, dict[str, Any]]:
    """What :func:`write_sweep` would write, in memory: for a reader whose files lag."""
    return trials_frame(trials), curves_frame(trials), {**metadata, "columns": TRIAL_COLUMNS}


def read_sweep(out: Path) -> tuple[pd.DataFrame, pd.DataFrame, dict[str, Any]]:
    """trials.parquet, curves.parquet and their metadata."""
    if not (out / TRIALS_FILE).exists():
        raise StudyError(
            f"{out}: no sweep here (no {JOURNAL_FILE}, {TRIALS_FILE} or "
            f"{PARTS_DIR}/); run lrsweep sweep --out there, or give --storage"
        )
    trials, meta = read_parquet(out / TRIALS_FILE)
    curves, _ = read_parquet(out / CURVES_FILE)
    return trials, curves, meta
