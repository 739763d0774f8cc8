"""The command line: a thin layer over find, sweep, report and export.

Heavy imports (torch, transformers, optuna) happen inside the commands, so ``--help`` is fast.
A user error prints one line and exits with code 2; Ctrl-C exits with 130.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import click

from lrsweep.config import DEFAULT_STUDY
from lrsweep.durations import parse_duration
from lrsweep.errors import LrsweepError
from lrsweep.interop import FORMATS as EXPORT_FORMATS


STUDY = click.argument("study", required=False, type=click.Path(dir_okay=False, path_type=Path))
SET = click.option(
    "--set",
    "overrides",
    multiple=True,
    metavar="SECTION.KEY=VALUE",
    help="Override one key of the study file (repeatable).",
)
QUIET = click.option("--quiet", "-q", is_flag=True, help="No progress bars.")
FROM = click.option(
    "--from",
    "from_config",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Your own training config (TrainingArguments/SFTConfig or TRL CLI JSON/YAML, Axolotl "
    "or LLaMA-Factory YAML): model, data, batch, LoRA, precision and planned length come from "
    "it, over STUDY's; --set still applies on top.",
)


def _optuna_logging() -> None:
    """Optuna's own INFO lines ("A new study created in Journal ...") only with -v."""
    import optuna

    verbose = click.get_current_context().find_root().params.get("verbose", False)
    optuna.logging.set_verbosity(optuna.logging.INFO if verbose else optuna.logging.WARNING)


def _with_run(from_config: Path | None, overrides: tuple[str, ...]) -> tuple[str, ...]:
    """The study keys read from the user's own config, before the --set ones; what lrsweep
    cannot honour of it is said, a line a key."""
    if from_config is None:
        return overrides
    from lrsweep.interop import read_run

    run = read_run(from_config)
    for note in run.notes:
        click.echo(f"note: {from_config.name}: {note}", err=True)
    # A trial length given with --set replaces the config's (max_steps or epochs) whole: with
    # the config's epochs left in, they would win over a shorter --set sweep.steps.
    trial_length = {"sweep.steps", "sweep.epochs"}
    if trial_length & {o.partition("=")[0].strip() for o in overrides}:
        run.values = {k: v for k, v in run.values.items() if k not in trial_length}
    return (*run.overrides(), *overrides)


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    # Read by transformers and huggingface_hub at import: no warnings chatter and no
    # "Loading weights" bars between lrsweep's own output.
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


@click.group()
@click.version_option(package_name="lrsweep")
@click.option("--verbose", "-v", is_flag=True, help="Log what happens (to stderr).")
def cli(verbose: bool) -> None:
    """Learning-rate range test and schedule sweep for LoRA fine-tuning."""
    _setup_logging(verbose)


@cli.command()
@STUDY
@SET
@FROM
@click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    help="Output folder (default runs/find-<timestamp>).",
)
@click.option(
    "--mode",
    type=click.Choice(["ramp", "probe"]),
    help="ramp: one run whose LR grows every step; probe: short runs at peak LRs from the "
    "same start (default: the study's rangetest.mode, probe).",
)
@QUIET
def find(
    study: Path | None,
    overrides: tuple[str, ...],
    from_config: Path | None,
    out: Path | None,
    mode: str | None,
    quiet: bool,
) -> None:
    """Run the LR range test and recommend a peak LR.

    STUDY is a TOML study file (default: the bundled SmolLM2-135M on the stdlib corpus).
    Writes rangetest.parquet, rangetest.png and suggestion.json to --out.
    """
    from lrsweep import config as config_mod
    from lrsweep.context import prepare
    from lrsweep.find import run_find, save_and_draw
    from lrsweep.horizon import how_sure
    from lrsweep.memory import check_memory
    from lrsweep.report import format_suggestion, format_trainer_snippet
    from lrsweep.results import check_writable

    overrides = _with_run(from_config, overrides)
    if mode is not None:
        overrides = (*overrides, f"rangetest.mode={mode}")
    cfg = config_mod.load(study, overrides)
    out = out or Path("runs") / time.strftime("find-%Y%m%d-%H%M%S")
    check_writable(out, "--out")
    ctx = prepare(cfg)
    memory, fits = check_memory(ctx)
    if memory:
        click.echo(memory)
    result = run_find(ctx, progress=not quiet, start=fits)
    save_and_draw(result, out)
    unit = "probe runs" if result.curve.mode == "probe" else "steps"
    if result.curve.seed_losses is not None:
        unit += f" x {len(result.curve.seed_losses[0])} seeds"
    click.echo(
        format_suggestion(result.suggestion, len(result.curve.lrs), result.curve.stop_reason, unit)
    )
    run = result.for_run()
    length = f"{run['max_steps']} steps" if run["max_steps"] else f"{run['epochs']:g} epochs"
    if run["epochs"] and run["steps"]:
        length += f" ({run['steps']} steps)"
    click.echo(
        f"For a run of {length} of {run['sequences_per_step']} x {run['seq_len']} tokens a "
        f"step, LoRA r = {run['lora_r']} (from {run['source']}); the number is the best "
        f"peak LR of a {run['calibrated_steps']}-step warmup + cosine fine-tune of that shape."
    )
    if result.recommended_lr is not None:
        click.echo(how_sure(result.curve.mode))
    click.echo(f"\nWrote {out}/rangetest.parquet, rangetest.png, suggestion.json")
    if result.recommended_lr is not None:
        click.echo("\nIn your own Trainer:\n" + format_trainer_snippet(result.recommended_lr, cfg))


STORAGE = click.option(
    "--storage",
    envvar="LRSWEEP_STORAGE",
    metavar="URL",
    help="postgresql://user:pw@host/db, mysql://..., or a journal file path (default: "
    "OUT/study.journal). Also read from $LRSWEEP_STORAGE, which keeps a password off "
    "the command line.",
)
STUDY_NAME = click.option(
    "--study",
    "study_name",
    default=DEFAULT_STUDY,
    show_default=True,
    help="Name of the study in the storage.",
)
TRIALS = click.option(
    "--trials",
    type=click.IntRange(min=1),
    help="Finished trials the whole study aims for (default sweep.trials).",
)


def sweep_out(help: str) -> Callable[[Callable[..., None]], Callable[..., None]]:
    return click.option(
        "--out",
        type=click.Path(file_okay=False, path_type=Path),
        default=Path("runs/sweep"),
        show_default=True,
        help=help,
    )


TIMEOUT = click.option("--timeout", help="Start no trial after this long, e.g. 8h or 90m.")


@cli.command()
@STUDY
@SET
@FROM
@sweep_out("Output folder: the study's journal, its results and plots.")
@TRIALS
@TIMEOUT
@STORAGE
@STUDY_NAME
@click.option(
    "--workers",
    type=click.IntRange(min=1),
    help="Worker processes on this machine sharing the study (default: one per --devices "
    "entry, else 1).",
)
@click.option(
    "--devices",
    help="Devices for the workers, round robin: cuda:0,cuda:1; cuda:0x4 is four workers on "
    "one GPU.",
)
@click.option("--dry-run", is_flag=True, help="Print the time estimate only.")
@QUIET
def sweep(
    study: Path | None,
    overrides: tuple[str, ...],
    from_config: Path | None,
    out: Path,
    trials: int | None,
    timeout: str | None,
    storage: str | None,
    study_name: str,
    workers: int | None,
    devices: str | None,
    dry_run: bool,
    quiet: bool,
) -> None:
    """Run (or resume) the Optuna sweep over peak LR, warmup and min_lr.

    Running it again with the same --out resumes the study; without STUDY it takes the
    config stored in the study. Ctrl-C stops it (exit code 130) and loses no finished trial.
    """
    from lrsweep import config as config_mod
    from lrsweep.devices import parse_devices
    from lrsweep.report import plot_find
    from lrsweep.results import check_writable
    from lrsweep.sweep.launch import spawn_workers
    from lrsweep.sweep.plan import execute, prepare_sweep

    _optuna_logging()
    seconds = parse_duration(timeout)
    device_list = parse_devices(devices, workers) if devices else []
    workers = len(device_list) or workers or 1
    # Without a study file, --set applies to the config stored in the study.
    overrides = _with_run(from_config, overrides)
    cfg = config_mod.load(study, overrides) if study or from_config else None
    if not dry_run:
        check_writable(out, "--out")
    prepared = prepare_sweep(
        cfg,
        out,
        overrides=() if study else overrides,
        storage=storage,
        study_name=study_name,
        trials=trials,
        timeout=seconds,
        progress=not quiet,
        dry_run=dry_run,
        device=device_list[0] if device_list else None,
    )
    if prepared.ran_find:
        plot_find(out)
    if prepared.memory:
        click.echo(prepared.memory)
    click.echo(prepared.estimate())
    if dry_run:
        return
    with _sigterm_stops():
        if workers > 1:
            code = spawn_workers(prepared, workers, device_list, quiet=quiet)
            if code:
                sys.exit(code)
        else:
            execute(prepared, progress=not quiet)
    _print_results(out, storage, study_name)


def _print_results(out: Path, storage: str | None, study_name: str) -> None:
    from lrsweep.report import format_trials
    from lrsweep.results import adapters_line
    from lrsweep.sweep.collect import load_results

    trials_frame, _, _ = load_results(out, storage, study_name)
    click.echo("\n" + format_trials(trials_frame, top=5))
    if line := adapters_line(out):
        click.echo("\n" + line)
    click.echo(
        f"\nResults in {out}: trials.parquet, curves.parquet; "
        f"lrsweep report {out} for plots, lrsweep export {out} for the best config"
    )


@cli.command()
@sweep_out("Folder for this worker's part files (and a journal study, if no --storage).")
@STORAGE
@STUDY_NAME
@TRIALS
@TIMEOUT
@click.option("--device", help="Override train.device for this worker, e.g. cuda:1.")
@click.option("--threads", type=click.IntRange(min=1), help="torch CPU threads.")
@click.option(
    "--wait",
    default="10m",
    show_default=True,
    help="How long to wait for the study to appear (start workers with the sweep; 0: not at all).",
)
@click.option("--sweep-json", hidden=True, help="The [sweep] section to use, as JSON.")
@click.option("--deadline", type=float, hidden=True, help="Start no trial after this epoch time.")
@QUIET
def worker(
    out: Path,
    storage: str | None,
    study_name: str,
    trials: int | None,
    timeout: str | None,
    device: str | None,
    threads: int | None,
    wait: str,
    sweep_json: str | None,
    deadline: float | None,
    quiet: bool,
) -> None:
    """Join an existing study and run its trials (on this or another machine).

    The study's config travels in the storage; the model and data paths it names must exist
    here too. Started before the study exists, it waits for it (--wait).
    """
    import json

    from lrsweep.sweep.plan import execute, prepare_sweep

    _optuna_logging()
    seconds, wait_seconds = parse_duration(timeout), parse_duration(wait, "--wait", zero=True)
    if device is not None:
        from lrsweep.devices import parse_devices

        parse_devices(device, 1)
    if threads:
        import torch

        torch.set_num_threads(threads)
    prepared = prepare_sweep(
        None,
        out,
        storage=storage,
        study_name=study_name,
        trials=trials,
        timeout=seconds,
        device=device,
        progress=not quiet,
        sweep_section=json.loads(sweep_json) if sweep_json else None,
        wait=wait_seconds or 0.0,
        deadline=deadline,
    )
    if prepared.left == 0 and prepared.confirmations_left == 0:
        click.echo(
            f"Nothing to do: the study has its {prepared.trials} finished trials and "
            "their confirmation runs."
        )
        return
    with _sigterm_stops():
        execute(prepared, progress=not quiet, part=True)


@contextmanager
def _sigterm_stops() -> Iterator[None]:
    """SIGTERM ends the sweep like Ctrl-C (the running trial is recorded), with exit 143;
    the handler that was there comes back afterwards (for a Python caller of ``main``)."""
    import signal

    def handler(signum: int, frame: object) -> None:
        raise Terminated()

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


class Terminated(KeyboardInterrupt):
    exit_code = 143


@cli.command()
@click.argument("out", type=click.Path(file_okay=False, path_type=Path))
@click.option(
    "--top", default=10, show_default=True, type=click.IntRange(min=1), help="Rows in the table."
)
@STORAGE
@STUDY_NAME
@click.option(
    "--plots",
    type=click.Path(file_okay=False, path_type=Path),
    help="Folder for the PNG plots (default OUT; a read-only OUT gets none unless given).",
)
def report(out: Path, top: int, storage: str | None, study_name: str, plots: Path | None) -> None:
    """What to use, the table of the best trials and plots (PNG) of a sweep in OUT.
    It only reads OUT (which may be read-only), apart from the plots it draws there."""
    from lrsweep.ranking import configurations, recommend, seed_noise
    from lrsweep.record import BASELINE_ORIGIN, FIRST_ORIGIN
    from lrsweep.report import (
        format_configurations,
        format_recommendation,
        format_trials,
        plot_sweep,
    )
    from lrsweep.results import read_find, writable
    from lrsweep.sweep.collect import load_results, stale_lines

    trials, curves, _ = load_results(out, storage, study_name)
    click.echo(format_recommendation(recommend(trials, FIRST_ORIGIN, BASELINE_ORIGIN)) + "\n")
    configs = configurations(trials)
    if table := format_configurations(configs, seed_noise(configs)):
        click.echo(table + "\n")
    click.echo(format_trials(trials, top=top))
    for line in stale_lines(out, storage, study_name):
        click.echo(line)
    if plots is None and not writable(out):
        click.echo(f"\nNo plots: {out} is read-only; --plots DIR draws them elsewhere")
        return
    folder = plots or out
    folder.mkdir(parents=True, exist_ok=True)
    found = read_find(out)
    spent = found[1].get("optimizer_steps", 0) if found else 0
    paths, missing = plot_sweep(trials, curves, folder, spent)
    click.echo("\n" + (missing or "Plots: " + ", ".join(str(p) for p in paths)))


@cli.command()
@click.argument("out", type=click.Path(file_okay=False, path_type=Path))
@STORAGE
@STUDY_NAME
def reap(out: Path, storage: str | None, study_name: str) -> None:
    """Fail the trials of dead workers in OUT's study and queue their parameters again, and
    bring the result files up to date (a running sweep does both itself)."""
    from lrsweep.sweep.collect import reap as reap_trials

    reaped = reap_trials(out, storage, study_name)
    done = ", ".join(str(n) for n in reaped)
    click.echo(f"Reaped trials {done}; queued again." if reaped else "No stale trials.")
    click.echo(f"Result files in {out} are up to date.")


@cli.command()
@click.argument("out", type=click.Path(file_okay=False, path_type=Path))
@click.option(
    "--format",
    "fmt",
    type=click.Choice(EXPORT_FORMATS),
    help="json, yaml, python: TrainingArguments / SFTConfig; axolotl, llamafactory: their "
    "YAML; llamafactory-cli: overrides of llamafactory-cli train; llamacpp: llama-finetune "
    "flags (default json).",
)
@click.option(
    "--into",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Your own training config (TrainingArguments/SFTConfig JSON or YAML, Axolotl or "
    "LLaMA-Factory YAML): print a copy with the schedule filled in, every other byte as it was.",
)
@click.option("--max-steps", type=click.IntRange(min=1), help="The planned run's length.")
@click.option(
    "--epochs", type=click.FloatRange(min=0, min_open=True), help="The planned run's epochs."
)
@click.option(
    "--output",
    "-o",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Write to this file (atomically) instead of printing.",
)
@click.option(
    "--adapter", is_flag=True, help="Print where the best trial's saved adapter is instead."
)
@STORAGE
@STUDY_NAME
def export(
    out: Path,
    fmt: str | None,
    into: Path | None,
    max_steps: int | None,
    epochs: float | None,
    output: Path | None,
    adapter: bool,
    storage: str | None,
    study_name: str,
) -> None:
    """The recommended schedule (the best mean over seeds) for the planned run, in the config
    of the tool you train with; what it is, which run it is for and how sure go to stderr."""
    from lrsweep import config as config_mod
    from lrsweep.export import planned_run, recommendation, recommendation_note, render
    from lrsweep.results import atomic_write, check_writable
    from lrsweep.sweep.collect import load_results

    if adapter:
        click.echo(_adapter_line(out, storage, study_name))
        return
    if into is not None and fmt is not None:
        raise LrsweepError("--format has no effect with --into (the file's own format is kept)")
    if max_steps and epochs:
        raise LrsweepError("give --max-steps or --epochs, not both")
    trials, _, meta = load_results(out, storage, study_name)
    rec = recommendation(trials)
    best = rec.best.row
    cfg = config_mod.from_stored(meta["config"])
    planned, source = planned_run(best, cfg, max_steps or 0, epochs or 0.0, into)
    text, notes = render(fmt or "json", best, cfg, planned, into)
    if output is None:
        click.echo(text)
    else:
        check_writable(output.parent, "-o")
        atomic_write(output, lambda tmp: tmp.write_text(text + "\n", encoding="utf-8"))
        click.echo(f"Wrote {output}", err=True)
    click.echo(f"For a run of {planned.length} (from {source}).", err=True)
    if planned.length != f"{int(best['total_steps'])} steps":
        click.echo(
            f"The sweep's trials ran {int(best['total_steps'])} steps; the peak LR, warmup "
            "fraction and floor carry over unchanged.",
            err=True,
        )
    for note in notes:
        click.echo(note, err=True)
    click.echo(recommendation_note(rec), err=True)


def _adapter_line(out: Path, storage: str | None, study_name: str) -> str:
    from lrsweep.export import recommendation
    from lrsweep.results import ADAPTERS_DIR, BEST_ADAPTER, adapters_line, read_adapter_info
    from lrsweep.sweep.collect import load_results

    best = out / ADAPTERS_DIR / BEST_ADAPTER
    info, line = read_adapter_info(best), adapters_line(out)
    if info is None or line is None:
        raise LrsweepError(
            f"{out}: no saved adapter (sweep.save_adapters = 'best' or 'all' keeps them)"
        )
    text = f"{best.resolve()}\n{line}\nLoad it with PeftModel.from_pretrained(base_model, path)."
    picked = recommendation(load_results(out, storage, study_name)[0]).best.number
    of = info.get("confirms") if info.get("confirms") is not None else info["trial"]
    if of != picked:
        text += (
            f"\nIt is the best single run, of trial {of}'s configuration; lrsweep export "
            f"recommends trial {picked}'s (the best mean over seeds)."
        )
    return text


@cli.command()
@click.argument("out", type=click.Path(file_okay=False, path_type=Path))
@STORAGE
@STUDY_NAME
@click.option("--port", default=8080, show_default=True, type=int)
@click.option("--host", default="127.0.0.1", show_default=True)
def dashboard(out: Path, storage: str | None, study_name: str, port: int, host: str) -> None:
    """Browse the study of OUT in optuna-dashboard (pip install 'lrsweep[dashboard]')."""
    import importlib.util

    if importlib.util.find_spec("optuna_dashboard") is None:
        raise LrsweepError("optuna-dashboard is not installed: pip install 'lrsweep[dashboard]'")
    from optuna_dashboard import run_server

    from lrsweep.sweep.storage import journal_path, open_storage

    journal = journal_path(out, storage)
    if storage is None and (journal is None or not journal.exists()):
        raise LrsweepError(f"{out}: no study journal here; give --storage for a database")
    backend = open_storage(out, storage, create=False, read_only=True)
    click.echo(f"optuna-dashboard on http://{host}:{port} (study {study_name!r}); Ctrl-C stops it")
    run_server(backend.backend, host=host, port=port)


def main() -> None:
    try:
        cli.main(standalone_mode=False)
    except LrsweepError as err:
        click.echo(f"error: {err}", err=True)
        sys.exit(err.exit_code)
    except (KeyboardInterrupt, click.exceptions.Abort) as err:
        click.echo(
            "interrupted; finished trials are kept, run the same command to resume", err=True
        )
        # click turns the KeyboardInterrupt (or our SIGTERM subclass of it) into an Abort.
        cause = err.__context__ if isinstance(err, click.exceptions.Abort) else err
        sys.exit(getattr(cause, "exit_code", 130))
    except click.ClickException as err:
        # One line, like lrsweep's own errors: the usage text would bury it.
        click.echo(f"error: {err.format_message()}", err=True)
        sys.exit(err.exit_code)
    except click.exceptions.Exit as err:
        sys.exit(err.exit_code)
