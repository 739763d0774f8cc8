"""lrsweep's answer masks against TRL's own, token by token, on the bundled SmolLM2-Instruct
tokenizer and chat template: TRL's SFTTrainer prepares the same rows (chat with
``assistant_only_loss``, prompt-completion with ``completion_only_loss``) and its labels must be
lrsweep's labels. SmolLM2's template has no ``{% generation %}`` markers (and TRL cannot patch
it), so TRL gets a copy with the markers around each assistant message and its end-of-turn
text; the copy is checked to render every conversation exactly as the stock template does,
while lrsweep renders with the stock template."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from datasets import Dataset
from transformers import LlamaConfig, LlamaForCausalLM
from trl import SFTConfig, SFTTrainer

from lrsweep.config import DataConfig, ModelConfig, TrainConfig
from lrsweep.data.reading import parse_row
from lrsweep.data.render import Renderer
from lrsweep.models import HFTokenizer, load_base_model


pytestmark = pytest.mark.slow  # the bundled model's tokenizer


ASSISTANT = (
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
)
MARKED = (
    "{% if message['role'] == 'assistant' %}{{ '<|im_start|>assistant\n' }}{% generation %}"
    "{{ message['content'] + '<|im_end|>' + '\n' }}{% endgeneration %}{% else %}"
    + ASSISTANT
    + "{% endif %}"
)
CODE = "    total = 0\n    for x in items:\n        total += x\n    return total"


def _chat_rows() -> list[dict[str, Any]]:
    return [
        {
            "messages": [
                {"role": "user", "content": "Sum a list."},
                {"role": "assistant", "content": CODE},
            ]
        },
        {
            "messages": [
                {"role": "system", "content": "You write Python."},
                {"role": "user", "content": "Write `add`."},
                {"role": "assistant", "content": "def add(a, b):\n    return a + b"},
                {"role": "user", "content": "And `sub`?"},
                {
                    "role": "assistant",
                    "content": "```python\ndef sub(a, b):\n    return a - b\n```",
                },
            ]
        },
        {
            "messages": [
                {"role": "user", "content": "Hi!"},
                {"role": "assistant", "content": " Hello, how can I help?"},
                {"role": "user", "content": "Nothing, thanks."},
            ]
        },
        {
            "messages": [
                {"role": "user", "content": "Say héllo in 日本語."},
                {"role": "assistant", "content": "こんにちは\n"},
            ]
        },
    ]


def _conversational_pc_rows() -> list[dict[str, Any]]:
    rows = []
    for row in _chat_rows()[:2]:
        messages = row["messages"]
        rows.append({"prompt": messages[:-1], "completion": messages[-1:]})
    return rows


def _pc_rows() -> list[dict[str, Any]]:
    return [
        {"prompt": "def total(items):\n", "completion": CODE},
        {"prompt": "The capital of France is", "completion": " Paris."},
        {"prompt": "Q: 2 + 2 =", "completion": " 4"},
    ]


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    base = load_base_model(ModelConfig(path="bundled"), TrainConfig(device="cpu"))
    return base.tokenizer.tokenizer  # type: ignore[attr-defined]


@pytest.fixture(scope="module")
def model(tokenizer: Any) -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        intermediate_size=32,
    )
    return LlamaForCausalLM(config)


def _trl_labels(
    tokenizer: Any, model: LlamaForCausalLM, rows: list[dict[str, Any]], tmp: Path, **flags: Any
) -> list[tuple[list[int], list[int]]]:
    config = SFTConfig(
        output_dir=str(tmp),
        report_to="none",
        max_length=None,
        bf16=False,
        gradient_checkpointing=False,
        use_cpu=True,
        **flags,
    )
    trainer = SFTTrainer(
        model=model, args=config, train_dataset=Dataset.from_list(rows), processing_class=tokenizer
    )
    data = trainer.train_dataset
    return [(list(r["input_ids"]), list(r["labels"])) for r in data]


def _ours(
    tokenizer: Any, rows: list[dict[str, Any]], train_on: str
) -> list[tuple[list[int], list[int]]]:
    fmt = "chat" if "messages" in rows[0] else "prompt_completion"
    parsed = [parse_row(r, f"row {i}", fmt, "test") for i, r in enumerate(rows, 1)]
    encoded = Renderer(HFTokenizer(tokenizer), DataConfig(train_on=train_on)).encode(parsed, "t")
    return [(e.input_ids, e.labels) for e in encoded]


def _same(ours: list[tuple[list[int], list[int]]], trl: list[tuple[list[int], list[int]]]) -> None:
    assert len(ours) == len(trl)
    for (ids, labels), (trl_ids, trl_labels) in zip(ours, trl, strict=True):
        assert ids == trl_ids
        # Position 0 is never predicted (the loss shifts labels), so its label is moot.
        assert labels[1:] == trl_labels[1:]


@pytest.fixture(scope="module")
def marked(tokenizer: Any) -> str:
    """SmolLM2's template with generation markers; it must render exactly as the stock one."""
    stock = tokenizer.chat_template
    assert ASSISTANT in stock, "the bundled chat template changed; update MARKED"
    template = stock.replace(ASSISTANT, MARKED)
    for row in _chat_rows():
        for gen in (False, True):
            kwargs = {"tokenize": False, "add_generation_prompt": gen}
            assert tokenizer.apply_chat_template(
                row["messages"], chat_template=template, **kwargs
            ) == tokenizer.apply_chat_template(row["messages"], **kwargs)
    return template


def test_chat_masks_match_trl_assistant_only_loss(
    tokenizer: Any, model: LlamaForCausalLM, marked: str, tmp_path: Path
) -> None:
    rows = _chat_rows()
    ours = _ours(tokenizer, rows, "answers")
    stock = tokenizer.chat_template
    tokenizer.chat_template = marked
    try:
        trl = _trl_labels(tokenizer, model, rows, tmp_path, assistant_only_loss=True)
    finally:
        tokenizer.chat_template = stock
    _same(ours, trl)
    # Every assistant turn is trained (and nothing else): the test can fail.
    trained = [sum(label != -100 for label in labels) for _, labels in ours]
    assert all(0 < n < len(ids) / 2 for n, (ids, _) in zip(trained, ours, strict=True))
    assert tokenizer.decode([t for t in ours[2][1] if t != -100]) == (
        " Hello, how can I help?<|im_end|>\n"
    )
    default = _trl_labels(tokenizer, model, rows, tmp_path / "all")  # TRL's: every token
    _same(_ours(tokenizer, rows, "all"), default)
    _same(_ours(tokenizer, rows, "completions"), default)


def test_conversational_prompt_completion_masks_match_trl(
    tokenizer: Any, model: LlamaForCausalLM, marked: str, tmp_path: Path
) -> None:
    rows = _conversational_pc_rows()
    ours = _ours(tokenizer, rows, "answers")
    default = _trl_labels(tokenizer, model, rows, tmp_path)  # completion_only_loss default
    _same(ours, default)
    _same(_ours(tokenizer, rows, "completions"), default)
    stock = tokenizer.chat_template
    tokenizer.chat_template = marked
    try:  # the combination TRL's docs recommend gives the same labels here
        both = _trl_labels(tokenizer, model, rows, tmp_path / "b", assistant_only_loss=True)
    finally:
        tokenizer.chat_template = stock
    _same(ours, both)
    # The generation prompt's newline merges with the code's indentation into one token
    # ("\n   "), so the answer starts on it, in TRL as here.
    answer = tokenizer.decode([t for t in ours[0][1] if t != -100])
    assert answer == "\n" + CODE + "<|im_end|>\n"
    all_ours = _ours(tokenizer, rows, "all")
    _same(
        all_ours, _trl_labels(tokenizer, model, rows, tmp_path / "a", completion_only_loss=False)
    )


def test_prompt_completion_masks_match_trl(
    tokenizer: Any, model: LlamaForCausalLM, tmp_path: Path
) -> None:
    rows = _pc_rows()
    ours = _ours(tokenizer, rows, "answers")
    default = _trl_labels(tokenizer, model, rows, tmp_path)
    _same(ours, default)
    _same(_ours(tokenizer, rows, "completions"), default)
    assert tokenizer.decode([t for t in ours[1][1] if t != -100]) == " Paris.<|im_end|>"
    all_ours = _ours(tokenizer, rows, "all")
    _same(
        all_ours, _trl_labels(tokenizer, model, rows, tmp_path / "a", completion_only_loss=False)
    )
    assert torch.tensor(all_ours[1][1][1:]).ne(-100).all()
