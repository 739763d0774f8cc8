from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from lrsweep import config as config_mod
from lrsweep.config import StudyConfig


ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def tiny_config(*overrides: str) -> StudyConfig:
    """studies/tiny.toml with overrides: a random tiny Llama on a slice of the stdlib."""
    return config_mod.load(ROOT / "studies" / "tiny.toml", list(overrides))


@pytest.fixture
def tiny() -> StudyConfig:
    return tiny_config()


# A plain ChatML template (no generation markers, like most stock templates).
CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + "
    "message['content'] + '<|im_end|>' + '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def chat_tokenizer(template: str | None = CHATML) -> PreTrainedTokenizerFast:
    """Byte-level BPE without merges (one token per byte) plus ChatML's two special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    backend = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend, eos_token="<|im_end|>", pad_token="<|im_end|>"
    )
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>"]})
    tok.chat_template = template
    return tok


def tiny_llama(
    tokenizer: PreTrainedTokenizerFast, hidden: int = 64, layers: int = 2, seed: int = 0
) -> LlamaForCausalLM:
    """A random Llama of ``hidden`` width over ``tokenizer``'s vocabulary (GQA, 2 KV heads
    where the width allows), seeded."""
    heads = max(2, hidden // 16)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=max(1, heads // 2),
        intermediate_size=2 * hidden,
        max_position_embeddings=1024,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def default_sigint() -> None:
    """Ctrl-C as Python handles it by default. A suite started in the background by a
    non-interactive shell inherits SIGINT ignored, and so would every process it starts;
    the interrupt tests need the real thing (``preexec_fn`` for a subprocess)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.fixture
def python_sigint() -> Iterator[None]:
    """Python's own KeyboardInterrupt handler in this process for the test (see
    default_sigint), the previous handler restored after it."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


@pytest.fixture(autouse=True)
def _isolated_cache(
    tmp_path_factory: pytest.TempPathFactory,
    monkeypatch: pytest.MonkeyPatch,
    request: pytest.FixtureRequest,
) -> None:
    # Fast tests never touch the user's model cache; slow tests share the real one so that
    # the bundled model is converted once per machine.
    if "slow" not in request.keywords:
        monkeypatch.setenv("LRSWEEP_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))


def run_cli(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, *args: str
) -> tuple[int, str, str]:
    """Run ``lrsweep ARGS`` in-process through the real entry point; (exit code, out, err)."""
    from lrsweep.cli import main

    monkeypatch.setattr("sys.argv", ["lrsweep", *args])
    code = 0
    try:
        main()
    except SystemExit as exit_:
        code = int(exit_.code or 0)
    captured = capsys.readouterr()
    return code, captured.out, captured.err
