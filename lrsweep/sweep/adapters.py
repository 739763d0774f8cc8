"""The trained adapters kept: ``sweep.save_adapters = "best" | "all" | "none"``.

A trial that ran every step saves its adapter (peft ``save_pretrained``), the tokenizer and
``lrsweep_adapter.json`` (its trial, eval loss, seed and schedule) into a temporary folder
beside ``OUT/adapters/trial-<n>``, renamed into place once complete. ``OUT/adapters/best`` is a
relative link to the best one so far, replaced atomically (a new link renamed over it) when a
better trial finishes; with ``best`` the folder it pointed to is then removed. Load it with
``PeftModel.from_pretrained(base_model, "OUT/adapters/best")``.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tqdm.auto import tqdm

from lrsweep.config import StudyConfig
from lrsweep.record import TrialRecord
from lrsweep.results import (
    ADAPTER_INFO,
    ADAPTERS_DIR,
    BEST_ADAPTER,
    adapter_folder,
    folder_bytes,
    locked,
    read_adapter_info,
    size_text,
    umask,
    write_json,
)


if TYPE_CHECKING:
    from optuna.trial import Trial
    from peft import PeftModel

    from lrsweep.models import Tokenizer
    from lrsweep.sweep.trial import TrialRun
    from lrsweep.training import StepRecord


logger = logging.getLogger(__name__)


class AdapterKeeper:
    """A trial watcher that saves finished trials' adapters as ``sweep.save_adapters`` says."""

    def __init__(self, out: Path, config: StudyConfig, tokenizer: Tokenizer) -> None:
        self.out, self.config, self.tokenizer = out, config, tokenizer
        self.mode = config.sweep.save_adapters
        self.trial: Trial | None = None

    def start(self, trial: Trial, run: TrialRun) -> None:
        self.trial = trial

    def step(self, record: StepRecord) -> None:
        pass

    def end(self, model: PeftModel, run: TrialRun, finished: bool) -> None:
        loss = run.records[-1].eval_loss if run.records else None
        if self.mode == "none" or not finished or loss is None or not math.isfinite(loss):
            return
        assert self.trial is not None
        best = self.out / ADAPTERS_DIR / BEST_ADAPTER
        if self.mode == "best" and not _beats(loss, best):
            return
        folder = save_adapter(model, self.tokenizer, self.out, self._info(run, loss))
        size = size_text(folder_bytes(folder))
        # Decided again under the lock: another worker may have pointed the link at a better
        # adapter while this one was saved, and must not lose it to this one.
        with locked(best.parent):
            better = _beats(loss, best)
            if better:
                previous = best.resolve() if best.is_symlink() else None
                _point(best, folder.name)
                if self.mode == "best" and previous is not None and previous != folder.resolve():
                    shutil.rmtree(previous, ignore_errors=True)
            elif self.mode == "best":
                shutil.rmtree(folder, ignore_errors=True)
                return
        tqdm.write(
            f"adapter of trial {self.trial.number} saved in {folder} ({size})"
            + (f"; {best} points to it" if better else "")
        )

    def _info(self, run: TrialRun, loss: float) -> dict[str, Any]:
        assert self.trial is not None
        queued = TrialRecord.of(self.trial)
        return {
            "trial": self.trial.number,
            "eval_loss": loss,
            "seed": queued.seed_or(self.config.seed),
            "confirms": queued.confirms,
            "schedule": run.schedule.family,
            "training_arguments": run.schedule.trainer_kwargs(),
            "loraplus_lr_ratio": run.loraplus_lr_ratio,
            "base_model": self.config.model.path,
            "lora": self.config.to_dict()["lora"],
        }


def save_adapter(model: PeftModel, tokenizer: Tokenizer, out: Path, info: dict[str, Any]) -> Path:
    """``OUT/adapters/trial-<n>``: adapter, tokenizer and info, written to a temporary folder
    that is renamed into place once complete."""
    dest = adapter_folder(out, info["trial"])
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
    try:
        model.save_pretrained(str(tmp))
        tokenizer.save_pretrained(tmp)  # type: ignore[attr-defined]
        write_json(info, tmp / ADAPTER_INFO)
        # mkdtemp (and peft's writer) make them private: give them the modes new files get.
        mask = umask()
        os.chmod(tmp, 0o777 & ~mask)
        for path in tmp.iterdir():
            os.chmod(path, 0o666 & ~mask)
        if dest.exists():
            shutil.rmtree(dest)
        os.rename(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dest


def _beats(loss: float, best: Path) -> bool:
    current = read_adapter_info(best)
    return current is None or loss < current["eval_loss"]


def _point(link: Path, target: str) -> None:
    """Make ``link`` a relative link to ``target`` beside it, atomically (rename over it)."""
    tmp = link.with_name(f".{link.name}.{os.getpid()}.tmp")
    tmp.unlink(missing_ok=True)
    os.symlink(target, tmp, target_is_directory=True)
    os.replace(tmp, link)
