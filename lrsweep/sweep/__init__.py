"""``lrsweep sweep``: an Optuna study over peak LR, warmup fraction and min_lr (and, where
asked, the schedule family and the LoRA+ ratio).

Each trial attaches a fresh LoRA adapter to the base model loaded once per process, trains it
with one of transformers' schedules (cosine with min LR by default), reports eval losses to
the pruner, and detaches the adapter again. Trials run in-process: loading the base model
once is what keeps a trial cheap. The modules, in the order a sweep uses them:

- ``space``: the search space and trial length (pure functions of the config)
- ``storage``: journal or database, heartbeats, stale trials, retries, redaction
- ``study``: creating and joining the study, and what travels in it
- ``plan``: planning a sweep (range test for the bounds, estimate) and running it here
- ``worker``: the ask-run-tell loop, every exit of a trial recorded
- ``trial``: what a trial records, the shared eval-and-prune rule, lrsweep's own runner
- ``confirm``: confirmation runs of the best configurations with fresh seeds
- ``adapters``: the trained adapters kept under OUT/adapters
- ``launch``: N worker processes on this machine
- ``collect``: the result files kept in step with the study (what report and export read)

What a trial and a study store is ``lrsweep.record``, the one reader and writer of Optuna's
user attributes. Nothing here is imported by ``import lrsweep.sweep``: reading results needs
no torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any


if TYPE_CHECKING:
    from lrsweep.sweep.plan import run_sweep

__all__ = ["run_sweep"]


def __getattr__(name: str) -> Any:
    if name == "run_sweep":
        from lrsweep.sweep.plan import run_sweep

        return run_sweep
    raise AttributeError(f"module 'lrsweep.sweep' has no attribute {name!r}")
