from __future__ import annotations

import json
from pathlib import Path

import pytest

from lrsweep import config as config_mod
from lrsweep.errors import ConfigError
from tests.conftest import ROOT, run_cli


def test_study_files_load_and_overrides_apply() -> None:
    cfg = config_mod.load(
        ROOT / "studies" / "default.toml",
        [
            "rangetest.runs=7",
            "data.path=my.jsonl",
            "lora.rslora=true",
            'lora.target_modules=["q_proj", "k_proj"]',
            "seed=3",
        ],
    )
    assert cfg.model.path == "bundled"
    assert cfg.rangetest.runs == 7
    assert cfg.data.path == "my.jsonl"  # a bare string needs no quotes
    assert cfg.lora.rslora is True
    assert cfg.lora.target_modules == ["q_proj", "k_proj"]
    assert cfg.seed == 3
    assert config_mod.load(ROOT / "studies" / "tiny.toml").model.path == "tiny"


def test_config_round_trips_through_json() -> None:
    cfg = config_mod.load(ROOT / "studies" / "tiny.toml", ["train.max_grad_norm=0.5"])
    assert config_mod.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


def test_int_accepted_for_float_but_not_the_reverse() -> None:
    assert config_mod.load(None, ["rangetest.end_lr=1"]).rangetest.end_lr == 1.0
    with pytest.raises(ConfigError, match="train.batch_size: must be an integer"):
        config_mod.load(None, ["train.batch_size=2.5"])


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("rangetest.start_lr=0.5", "rangetest.start_lr: must be below end_lr"),
        ("rangetest.start_lr=-1e-5", "rangetest.start_lr: must be positive"),
        ("rangetest.end_lr=-1", "rangetest.end_lr: must be positive"),
        ("rangetest.run_steps=0", "rangetest.run_steps: must be at least 1"),
        ("rangetest.run_steps=1", "rangetest.run_steps: must be at least 2 with run_schedule"),
        ("seed=-1", "seed: must be in"),
        ("seed=4294967296", "seed: must be in"),
        ("search.warmup_fraction=[0.1, 1.0]", "search.warmup_fraction: must stay below 1"),
        ("rangetest.steps=60", "rangetest.steps: has no effect in probe mode"),
        ("train.seq_len=7", "train.seq_len: must be at least 8"),
        ("train.batch_size=0", "train.batch_size: must be at least 1"),
        ("train.dtype=float64", "train.dtype: must be"),
        ("lora.dropout=1.5", "lora.dropout: must be in"),
        ("lora.target_modules=[]", "lora.target_modules: must name"),
        ("search.warmup_fraction=[0.3, 0.1]", "search.warmup_fraction: must be [low, high]"),
        ("search.min_lr_ratio=[0, 2]", "search.min_lr_ratio: bounds must lie in"),
        ("sweep.pruner=asha", "sweep.pruner: must be median"),
        ("train.bogus=1", "train.bogus: unknown key"),
        ("nosuch.key=1", "nosuch: unknown key"),
        ("train.seq_len=abc", "train.seq_len: must be an integer"),
        ("lora.rslora=1", "lora.rslora: must be true or false"),
        ("rangetest.steps", "expected section.key=value"),
        ("train.device=cuda:x", "train.device: must be auto, cpu, cuda, cuda:N or mps"),
        ("data.path=", "data.path: must not be empty"),  # --set data.path=$UNSET
    ],
)
def test_bad_values_name_the_key(override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("[", r"\[")):
        config_mod.load(None, [override])


def test_a_bound_of_none_from_python_names_the_key() -> None:
    """hf.sweep(peak_lr=(low, suggestion.divergence_lr)) where the range test never diverged."""
    with pytest.raises(ConfigError, match=r"search.peak_lr: must be \[low, high\] numbers"):
        config_mod.SearchConfig(peak_lr=[1e-4, None])  # type: ignore[list-item]


def test_bad_study_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[train]\nseq_len = \n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        config_mod.load(bad)
    with pytest.raises(ConfigError, match="no such study file"):
        config_mod.load(tmp_path / "missing.toml")
    unknown = tmp_path / "unknown.toml"
    unknown.write_text("[lora]\nrank = 8\n")
    with pytest.raises(ConfigError, match="lora.rank: unknown key"):
        config_mod.load(unknown)


@pytest.mark.parametrize(
    "override",
    [
        "rangetest.start_lr=20",
        "rangetest.steps=5",
        "train.seq_len=4",
        "rangetest.start_lr=-1",
        "x.y=1",
    ],
)
def test_cli_refuses_bad_input_with_one_line_and_exit_2(
    override: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    out = tmp_path / "find"
    code, stdout, err = run_cli(
        capsys,
        monkeypatch,
        "find",
        str(ROOT / "studies" / "tiny.toml"),
        "--set",
        override,
        "--out",
        str(out),
    )
    assert code == 2
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert "Traceback" not in err
    assert not out.exists()  # nothing half-written


def test_a_saved_config_from_before_run_schedule_reads_as_the_constant_runs_it_made() -> None:
    # Saved range tests and studies from before rangetest.run_schedule ran constant-LR
    # probes, some with a cooldown: reading them back must neither fail nor relabel them.
    raw = config_mod.StudyConfig().to_dict()
    del raw["rangetest"]["run_schedule"]
    raw["rangetest"].update(run_steps=6, cooldown_steps=3)
    stored = config_mod.from_stored(raw)
    assert stored.rangetest.run_schedule == "constant"
    assert stored.rangetest.cooldown_steps == 3
    assert config_mod.from_stored(config_mod.StudyConfig().to_dict()) == config_mod.StudyConfig()
    with pytest.raises(ConfigError, match="cooldown_steps"):
        config_mod.from_dict(raw)  # today's default (cosine) refuses the cooldown


def test_a_resume_compares_the_trial_length_that_counts() -> None:
    """sweep.steps has no effect where sweep.epochs sets the trial length."""
    keys = config_mod.STUDY_KEYS
    a = config_mod.load(None, ["sweep.epochs=2.0", "sweep.steps=300"])
    assert config_mod.differences(a, config_mod.load(None, ["sweep.epochs=2.0"]), keys) == []
    b = config_mod.load(None, ["sweep.epochs=3.0"])
    assert config_mod.differences(a, b, keys) == ["sweep.epochs"]
    c, d = config_mod.load(None, ["sweep.steps=50"]), config_mod.load(None, ["sweep.steps=60"])
    assert config_mod.differences(c, d, keys) == ["sweep.steps"]
