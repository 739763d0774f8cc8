"""llama.cpp's ``llama-finetune`` flags (export only: it reads no config file).

Its schedule is not lrsweep's: no warmup, and no cosine. With ``-lr-min`` the LR halves
geometrically from ``-lr`` to ``-lr-min`` over ``-decay-epochs``, one value per epoch
(common/common.cpp, ``lr_opt::get_lr``). The flags give the found peak and floor; what they
cannot express is said beside them.
"""

from __future__ import annotations

import shlex

from lrsweep.interop import Planned
from lrsweep.schedules import FLOORED


def flags(planned: Planned, weight_decay: float) -> tuple[str, list[str]]:
    """The command line, and one line for each part of the schedule llama.cpp cannot run."""
    args = ["llama-finetune", "-lr", f"{planned.peak_lr:.6g}"]
    lost = []
    floor = planned.min_lr_ratio * planned.peak_lr if planned.family in FLOORED else 0.0
    if planned.epochs:
        args += ["-epochs", f"{planned.epochs:g}"]
    else:
        lost.append(
            f"the planned run is {planned.max_steps} steps; llama-finetune counts epochs: set "
            "-epochs to what those steps are on your data"
        )
    if floor > 0:
        args += ["-lr-min", f"{floor:.6g}"]
        if planned.epochs:
            args += ["-decay-epochs", f"{planned.epochs:g}"]
        lost.append(
            f"{planned.family} decay: llama-finetune decays geometrically, one LR per epoch, "
            "from -lr to -lr-min"
        )
    elif planned.family != "constant":
        # lr_opt::get_lr: with -lr-min unset (-1) or <= 0 the LR is -lr throughout.
        lost.append(
            f"{planned.family} decay to 0: llama-finetune's LR is constant at -lr without a "
            "positive -lr-min (its decay halves toward -lr-min, never to 0)"
        )
    if planned.warmup_fraction > 0:
        lost.append(f"warmup ({planned.warmup_fraction:.3g} of the run): llama-finetune has none")
    if weight_decay:
        args += ["-wd", f"{weight_decay:g}"]
    if planned.loraplus_lr_ratio is not None:
        lost.append("LoRA+: llama-finetune trains every matrix at one LR")
    return shlex.join(args), lost
