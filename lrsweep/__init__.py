"""lrsweep: learning-rate range test and schedule sweep for LoRA fine-tuning.

The public API; heavy modules load on first use, so that ``lrsweep --help`` stays fast.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from lrsweep.version import __version__ as __version__


__all__ = ["FindResult", "StudyConfig", "Suggestion", "find_lr", "load_config", "run_sweep"]

if TYPE_CHECKING:
    from lrsweep.config import StudyConfig
    from lrsweep.config import load as load_config
    from lrsweep.find import FindResult, find_lr
    from lrsweep.suggest import Suggestion
    from lrsweep.sweep.plan import run_sweep

_LAZY = {
    "FindResult": ("lrsweep.find", "FindResult"),
    "find_lr": ("lrsweep.find", "find_lr"),
    "StudyConfig": ("lrsweep.config", "StudyConfig"),
    "load_config": ("lrsweep.config", "load"),
    "Suggestion": ("lrsweep.suggest", "Suggestion"),
    "run_sweep": ("lrsweep.sweep.plan", "run_sweep"),
}


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'lrsweep' has no attribute {name!r}")
    import importlib

    module, attr = _LAZY[name]
    return getattr(importlib.import_module(module), attr)
