"""``--workers N``: N ``lrsweep worker`` processes on this machine sharing one study.

Each worker loads its own model on its device (round robin over ``--devices``), CPU threads
are split between them, and each writes its own part files; this process waits and then
rebuilds the result files from the storage. The storage URL reaches the workers through the
environment, never their command line.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

from lrsweep.memory import free_memory
from lrsweep.sweep.collect import write_results
from lrsweep.sweep.plan import PreparedSweep


def _command(prepared: PreparedSweep, threads: int, device: str | None, quiet: bool) -> list[str]:
    plan = prepared.plan
    assert plan is not None
    cmd = [
        sys.executable,
        "-m",
        "lrsweep",
        "worker",
        "--out",
        str(plan.out),
        "--study",
        plan.study.study_name,
        "--trials",
        str(plan.trials),
        "--threads",
        str(threads),
        "--sweep-json",
        json.dumps(prepared.ctx.config.to_dict()["sweep"]),
    ]
    if device:
        cmd += ["--device", device]
    if plan.deadline:
        cmd += ["--deadline", f"{plan.deadline:.0f}"]
    if quiet:
        cmd.append("-q")
    return cmd


def spawn_workers(prepared: PreparedSweep, n: int, devices: list[str], *, quiet: bool) -> int:
    """Run ``n`` workers, wait for them and merge their results; the highest exit code."""
    plan = prepared.plan
    assert plan is not None, "a dry run starts no workers"
    env = dict(os.environ)
    if plan.storage.url:
        env["LRSWEEP_STORAGE"] = plan.storage.url
    threads = max(1, (os.cpu_count() or 1) // n)
    # The workers load their own copies; this process only waits and merges.
    prepared.ctx.base.model = None  # type: ignore[assignment]
    free_memory(prepared.ctx.base.device)
    procs = []
    for i in range(n):
        device = devices[i % len(devices)] if devices else None
        # One set of progress bars: several would interleave.
        cmd = _command(prepared, threads, device, quiet or i > 0)
        procs.append(subprocess.Popen(cmd, env=env))
    try:
        codes = [p.wait() for p in procs]
    except KeyboardInterrupt as err:
        # Ctrl-C in a terminal reaches the workers too; a signal sent to this process alone
        # (kill -INT, kill -TERM) is passed on after a moment.
        sig = signal.SIGTERM if getattr(err, "exit_code", 130) == 143 else signal.SIGINT
        for p in procs:
            try:
                p.wait(timeout=3)
            except subprocess.TimeoutExpired:
                p.send_signal(sig)
        for p in procs:
            p.wait()
        raise
    finally:
        write_results(plan.study, plan.storage, plan.out)
    return max(codes)
