"""Drawing and tables: PNG plots and the terminal text people read.

Only this module imports matplotlib (lazily, with the Agg backend), and it only reads data
frames and suggestions that other modules computed.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from lrsweep.config import StudyConfig
from lrsweep.ranking import Comparison, Configuration, Recommendation
from lrsweep.results import RANGETEST_PLOT, SWEEP_PLOTS, atomic_write, read_find
from lrsweep.schedules import FAMILIES, FIRST_MIN_LR_RATIO, FIRST_WARMUP_FRACTION
from lrsweep.suggest import Suggestion


if TYPE_CHECKING:
    from matplotlib.figure import Figure


def _figure(width: float = 8, height: float = 5) -> Figure:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout="constrained")


def _save(fig: Figure, path: Path) -> None:
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))


def _fmt(lr: float | None) -> str:
    return "-" if lr is None else f"{lr:.2e}"


_YLABELS = {
    "probe": "held-out loss at the end of each probe run",
    "eval": "held-out loss after each step",
    "train": "training loss",
}


def plot_find(out: Path) -> Path:
    """rangetest.png in ``out``, drawn from the range test saved there."""
    saved = read_find(out)
    assert saved is not None, f"no range test in {out}"
    frame, meta = saved
    rangetest = meta["config"]["rangetest"]
    kind = "probe" if rangetest.get("mode") == "probe" else rangetest["signal"]
    path = out / RANGETEST_PLOT
    suggestion = Suggestion.from_dict(meta["suggestion"])
    plot_rangetest(frame, suggestion, path, _YLABELS[kind], meta.get("start_loss"))
    return path


def plot_rangetest(
    curve: pd.DataFrame,
    suggestion: Suggestion,
    path: Path,
    ylabel: str = "loss",
    start_loss: float | None = None,
) -> None:
    """Loss against LR (log axis), raw and smoothed, with every suggestion marked; probe
    mode (``start_loss`` given) draws one point per run and the untrained loss."""
    fig = _figure()
    ax = fig.add_subplot()
    if start_loss is None:
        ax.plot(curve["lr"], curve["loss"], color="0.7", lw=1, label="loss")
        ax.plot(curve["lr"], curve["smoothed_loss"], color="C0", lw=2, label="smoothed loss")
    else:
        if "seed_losses" in curve:  # each seed's runs, under their mean
            by_seed = np.array(curve["seed_losses"].map(list).tolist(), dtype=float).T
            for k, losses in enumerate(by_seed):
                ax.plot(
                    curve["lr"], losses, ".", color="0.6", label="each seed" if k == 0 else None
                )
        label = "mean loss after the runs" if "seed_losses" in curve else "loss after the run"
        ax.plot(curve["lr"], curve["loss"], "o-", color="C0", lw=2, label=label)
        ax.axhline(start_loss, color="0.5", lw=1, ls="--", label="untrained")
    ax.set_xscale("log")
    ax.set_xlabel("learning rate")
    ax.set_ylabel(ylabel)
    finite = curve["loss"][np.isfinite(curve["loss"])]
    if len(finite):
        low, first = finite.min(), finite.iloc[: max(1, len(finite) // 10)].median()
        if start_loss is not None:
            first = start_loss
        ax.set_ylim(low - 0.05 * (first - low + 1e-9), first + 0.5 * (first - low + 1e-9))
    if suggestion.interval:
        ax.axvspan(*suggestion.interval, color="C2", alpha=0.15, label="interval")
    for i, (name, method) in enumerate(suggestion.methods.items()):
        if method.lr is not None:
            ax.axvline(
                method.lr, color=f"C{i + 3}", ls=":", lw=1.2, label=f"{name} {method.lr:.1e}"
            )
    if suggestion.recommended_lr is not None:
        ax.axvline(
            suggestion.recommended_lr,
            color="C2",
            lw=2,
            label=f"recommended {suggestion.recommended_lr:.1e}",
        )
    if suggestion.divergence_lr is not None:
        ax.axvline(
            suggestion.divergence_lr,
            color="C3",
            lw=1.5,
            ls="--",
            label=f"diverges {suggestion.divergence_lr:.1e}",
        )
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, which="both")
    ax.set_title("LR range test")
    _save(fig, path)


def format_suggestion(
    suggestion: Suggestion, points: int, stop_reason: str | None, unit: str = "steps"
) -> str:
    """The table of methods and the recommendation, as the CLI prints it."""
    lines = [
        f"Range test: {points} {unit}" + (f", stopped: {stop_reason}" if stop_reason else ""),
        "",
        f"  {'method':<9} {'lr':<10} note",
    ]
    for name, method in suggestion.methods.items():
        mark = "  <- basis" if name == suggestion.basis else ""
        lines.append(f"  {name:<9} {_fmt(method.lr):<10} {method.reason or ''}{mark}")
    lines.append("")
    if suggestion.recommended_lr is None:
        lines.append(f"No recommendation: {suggestion.reason}")
    else:
        lo, hi = suggestion.interval or (None, None)
        lines.append(
            f"Recommended peak LR: {_fmt(suggestion.recommended_lr)}"
            f"  (interval {_fmt(lo)} .. {_fmt(hi)})"
        )
    lines.append(f"Divergence LR:       {_fmt(suggestion.divergence_lr)}")
    lines.extend(f"warning: {w}" for w in suggestion.warnings)
    return "\n".join(lines)


def format_trainer_snippet(lr: float, config: StudyConfig) -> str:
    """A TrainingArguments call with the recommended LR, the study's batch shape and
    clipping, and transformers 5's schedule names (the warmup and floor are common defaults;
    lrsweep sweep tunes them)."""
    train = config.train
    return (
        "TrainingArguments(\n"
        f"    learning_rate={lr:.3g},\n"
        f'    lr_scheduler_type="{FAMILIES["cosine"]}",\n'
        f'    lr_scheduler_kwargs={{"min_lr_rate": {FIRST_MIN_LR_RATIO}}},\n'
        f"    warmup_steps={FIRST_WARMUP_FRACTION},  # < 1 is read as a fraction of max_steps\n"
        f"    per_device_train_batch_size={train.batch_size},\n"
        f"    gradient_accumulation_steps={train.grad_accum},\n"
        f"    max_grad_norm={train.max_grad_norm},\n"
        f"    seed={config.seed},\n"
        "    ...,\n"
        ")"
        + (
            f"\n# LoRA+ (the range test's): the learning_rate is the A matrices'; build the "
            f"optimizer with peft's\n# create_loraplus_optimizer(..., loraplus_lr_ratio="
            f"{train.loraplus_lr_ratio:g}) and pass Trainer(optimizers=(optimizer, None))"
            if train.loraplus_lr_ratio != 1
            else ""
        )
    )


# ---------------------------------------------------------------- sweep report


def format_trials(trials: pd.DataFrame, top: int = 10) -> str:
    """The best trials first (complete by eval loss, then pruned by their best eval loss)."""
    counts = trials["state"].value_counts().to_dict()
    head = "Trials: " + ", ".join(f"{n} {s.lower()}" for s, n in sorted(counts.items()))
    if trials.empty:
        return head
    ranked = (
        trials.assign(
            _done=trials["state"] != "COMPLETE",
            _key=trials["eval_loss"].fillna(trials["best_eval_loss"]),
        )
        .sort_values(["_done", "_key", "number"])
        .head(top)
    )
    if len(ranked) < len(trials):
        head += f"; the best {len(ranked)} of {len(trials)}:"
    lines = [
        head,
        "",
        f"  {'#':>4} {'state':<9} {'eval':>7} {'best':>7} {'peak_lr':>9} "
        f"{'warmup':>6} {'min_lr':>9} {'secs':>6}  reason",
    ]
    for _, t in ranked.iterrows():

        def num(v: float, fmt: str) -> str:
            return "-" if pd.isna(v) else format(v, fmt)

        lines.append(
            f"  {t['number']:>4} {t['state']:<9} {num(t['eval_loss'], '.4f'):>7} "
            f"{num(t['best_eval_loss'], '.4f'):>7} {num(t['peak_lr'], '.2e'):>9} "
            f"{num(t['warmup_steps'], 'd'):>6} {num(t['min_lr'], '.2e'):>9} "
            f"{num(t['seconds'], '.0f'):>6}  {_note(t)}"
        )
    return "\n".join(lines)


def _note(t: pd.Series) -> str:
    """The reason column: why it stopped, and what a confirmation run repeats."""
    notes = [] if pd.isna(t["reason"]) else [str(t["reason"])]
    confirms = t.get("confirms")
    if confirms is not None and pd.notna(confirms):
        notes.insert(0, f"confirms #{int(confirms)} (seed {int(t['seed'])})")
    return "; ".join(notes)


def plot_sweep(
    trials: pd.DataFrame, curves: pd.DataFrame, out: Path, rangetest_steps: int = 0
) -> tuple[list[Path], str | None]:
    """sweep_lr.png, sweep_top5.png and sweep_progress.png in ``out``: their paths, or
    none and the reason when no trial has an eval loss to draw yet."""
    scored = trials["eval_loss"].notna() | trials["best_eval_loss"].notna()
    if not (scored & trials["peak_lr"].notna()).any():
        return [], "no plots yet: no trial has an eval loss (none finished an evaluation)"
    paths = [out / name for name in SWEEP_PLOTS]
    _plot_lr(trials, paths[0])
    _plot_top(trials, curves, paths[1])
    _plot_progress(trials, curves, paths[2], rangetest_steps)
    return paths, None


def _plot_lr(trials: pd.DataFrame, path: Path) -> None:
    fig = _figure()
    ax = fig.add_subplot()
    done = trials[trials["state"] == "COMPLETE"]
    pruned = trials[trials["state"] == "PRUNED"]
    vmax = max(0.01, float(trials["warmup_fraction"].max() or 0))
    points = ax.scatter(
        done["peak_lr"],
        done["eval_loss"],
        c=done["warmup_fraction"],
        cmap="viridis",
        vmin=0,
        vmax=vmax,
        s=40,
        label="complete",
    )
    ax.scatter(
        pruned["peak_lr"],
        pruned["best_eval_loss"],
        facecolors="none",
        edgecolors="0.5",
        s=40,
        label="pruned (best eval loss)",
    )
    fig.colorbar(points, ax=ax, label="warmup fraction")
    ax.set_xscale("log")
    ax.set_xlabel("peak learning rate")
    ax.set_ylabel("eval loss")
    ax.set_title("Eval loss against peak LR")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, which="both")
    _save(fig, path)


def _plot_top(trials: pd.DataFrame, curves: pd.DataFrame, path: Path) -> None:
    fig = _figure(11, 4.5)
    lr_ax, eval_ax = fig.subplots(1, 2)
    top = trials[trials["state"] == "COMPLETE"].sort_values("eval_loss").head(5)
    for i, (_, t) in enumerate(top.iterrows()):
        c = curves[curves["number"] == t["number"]]
        label = f"#{t['number']} {t['eval_loss']:.4f}"
        lr_ax.plot(c["step"], c["lr"], color=f"C{i}", label=label)
        ev = c[c["eval_loss"].notna()]
        eval_ax.plot(ev["step"] + 1, ev["eval_loss"], "o-", color=f"C{i}", ms=3, label=label)
    lr_ax.set(xlabel="optimizer step", ylabel="learning rate", title="Schedules of the top 5")
    eval_ax.set(xlabel="optimizer steps done", ylabel="eval loss", title="Eval loss")
    for ax in (lr_ax, eval_ax):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    _save(fig, path)


def _plot_progress(
    trials: pd.DataFrame, curves: pd.DataFrame, path: Path, rangetest_steps: int
) -> None:
    fig = _figure()
    ax = fig.add_subplot()
    order = trials.sort_values("number")
    steps = curves.groupby("number").size().reindex(order["number"]).fillna(0).to_numpy()
    spent = rangetest_steps + np.cumsum(steps)
    best = order["eval_loss"].fillna(np.inf).cummin().replace(np.inf, np.nan).to_numpy()
    ax.step(spent, best, where="post", color="C0")
    ax.plot(spent, best, "o", color="C0", ms=3)
    if rangetest_steps:
        ax.axvline(rangetest_steps, color="0.6", ls=":", label="range test")
        ax.legend(fontsize=8)
    ax.set(
        xlabel="optimizer steps spent",
        ylabel="best eval loss so far",
        title="Best eval loss against compute",
    )
    ax.grid(alpha=0.3)
    _save(fig, path)


# ---------------------------------------------------------------- what to use


def _schedule_words(row: pd.Series) -> str:
    family = row.get("schedule")
    family = family if isinstance(family, str) else "cosine"
    words = (
        f"{family} schedule, peak LR {row['peak_lr']:.2e}, warmup {int(row['warmup_steps'])} steps"
    )
    if family in ("cosine", "wsd"):
        words += f", min_lr ratio {row['min_lr_ratio']:.2f}"
    ratio = row.get("loraplus_lr_ratio")
    if ratio is not None and pd.notna(ratio) and ratio != 1:
        words += f", LoRA+ ratio {ratio:.3g}"
    return words


def _beats(label: str, c: Comparison) -> str:
    other = c.other
    text = f"{label} (trial {other.number}, peak LR {other.row['peak_lr']:.2e}, {other.mean:.4f}"
    text += f" over {other.n} runs)" if other.n > 1 else ")"
    verb = "beats" if c.margin > 0 else "does not beat"
    noise = f" = {abs(c.margin) / c.noise:.1f}x the seed noise" if c.noise else ""
    return f"It {verb} {text} by {c.margin:+.4f}{noise}."


def format_recommendation(rec: Recommendation | None) -> str:
    """The paragraph at the top of ``lrsweep report``: what to use, and how sure."""
    if rec is None:
        return "No recommendation yet: no trial is complete."
    best = rec.best
    origin = best.row.get("origin")
    source = f"trial {best.number}" + (f", the {origin}" if isinstance(origin, str) else "")
    lines = [f"Use: {_schedule_words(best.row)} ({source})."]
    if rec.confirmed:
        lines.append(
            f"Eval loss {best.mean:.4f} +- {best.spread:.4f} over {best.n} seeds; the seed "
            f"noise of one run is {rec.noise:.4f}."
        )
    else:
        noise = f" (seed noise {rec.noise:.4f})" if rec.noise else ""
        lines.append(
            f"Eval loss {best.mean:.4f} in one run, not confirmed with other seeds{noise}: "
            "set sweep.confirm_top to know how sure."
        )
    for label, comparison in (
        ("the runner-up", rec.runner_up),
        ("the range test's first guess", rec.first_guess),
        ("the common default", rec.baseline),
    ):
        if comparison is not None:
            lines.append(_beats(label, comparison))
    return " ".join(lines)


def format_configurations(configs: list[Configuration], noise: float | None) -> str:
    """Mean +- spread of every configuration with several seeds, next to the seed noise."""
    several = [c for c in configs if c.n >= 2]
    if not several:
        return ""
    best = several[0].mean
    lines = [
        f"Configurations over seeds (seed noise of one run: {noise:.4f}):",
        "",
        f"  {'#':>4} {'runs':>4} {'mean':>7} {'spread':>7} {'vs best':>8} {'schedule':<9} "
        f"{'peak_lr':>9}",
    ]
    for c in several:
        family = c.row.get("schedule")
        family = family if isinstance(family, str) else "cosine"
        lines.append(
            f"  {c.number:>4} {c.n:>4} {c.mean:>7.4f} {c.spread:>7.4f} {c.mean - best:>+8.4f} "
            f"{family:<9} {c.row['peak_lr']:>9.2e}"
        )
    return "\n".join(lines)
