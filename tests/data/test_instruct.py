"""Instruction data: formats, row checks, chat templates, answer masks, sequences, packing,
the token-weighted loss, and find / sweep end to end on a tiny chat model."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pytest
import torch
from transformers import LlamaForCausalLM

from lrsweep.config import DataConfig, TrainConfig
from lrsweep.data import Examples, batches, load_blocks, read_data, stdlib_instruct
from lrsweep.data.render import Renderer
from lrsweep.data.sequences import pack, to_examples, trim
from lrsweep.errors import ConfigError, DataError
from lrsweep.models import ByteTokenizer, HFTokenizer
from lrsweep.training import Loop, Precision, evaluate, train
from tests.conftest import CHATML, chat_tokenizer, run_cli, tiny_config, tiny_llama


TRAIN = TrainConfig(seq_len=256, batch_size=2)
CPU = Precision(torch.device("cpu"), torch.float32)


@pytest.fixture(scope="module")
def tok() -> HFTokenizer:
    return HFTokenizer(chat_tokenizer())


@pytest.fixture(scope="module")
def chat_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Llama with the ChatML byte tokenizer, saved as a model folder."""
    folder = tmp_path_factory.mktemp("tiny-chat")
    tokenizer = chat_tokenizer()
    tiny_llama(tokenizer).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def chat_rows(n: int = 40) -> list[dict]:
    rows = []
    for i in range(n):
        messages = [
            {"role": "user", "content": f"What is {i} plus {i}?"},
            {"role": "assistant", "content": f"It is {2 * i}."},
        ]
        if i % 3 == 0:  # multi-turn rows, some starting with a system message
            messages = [
                {"role": "system", "content": "Be brief."},
                *messages,
                {"role": "user", "content": "And times two?"},
                {"role": "assistant", "content": f"{4 * i}"},
            ]
        rows.append({"messages": messages})
    return rows


def pc_rows(n: int = 40, conversational: bool = False) -> list[dict]:
    rows = []
    for i in range(n):
        prompt, completion = f"Count to {i % 7 + 2}:", " " + " ".join(map(str, range(i % 7 + 2)))
        if conversational:
            rows.append(
                {
                    "prompt": [{"role": "user", "content": prompt}],
                    "completion": [{"role": "assistant", "content": completion}],
                }
            )
        else:
            rows.append({"prompt": prompt, "completion": completion})
    return rows


def write(path: Path, rows: list[dict]) -> Path:
    kind = path.suffix or "arrow"
    if kind == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif kind == ".json":
        path.write_text(json.dumps(rows))
    elif kind == ".parquet":
        pd.DataFrame(rows).to_parquet(path)
    elif kind == ".csv":
        frame = pd.DataFrame(rows)
        for column in frame:
            frame[column] = [json.dumps(v) if isinstance(v, list) else v for v in frame[column]]
        frame.to_csv(path, index=False)
    else:  # datasets' save_to_disk layout
        path.mkdir()
        table = pa.Table.from_pylist(rows)
        with pa.OSFile(str(path / "data-00000-of-00001.arrow"), "wb") as sink:
            with pa.ipc.new_stream(sink, table.schema) as writer:
                writer.write_table(table)
    return path


def decode_answers(tok: HFTokenizer, example: dict[str, torch.Tensor]) -> str:
    ids, labels = example["input_ids"][0], example["labels"][0]
    return tok.tokenizer.decode(ids[labels != -100])


# --- formats and rows -------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".parquet", ".csv", ""])
@pytest.mark.parametrize(
    ("rows", "fmt"),
    [
        (chat_rows(), "chat"),
        (pc_rows(), "prompt_completion"),
        (pc_rows(conversational=True), "prompt_completion"),
    ],
)
def test_formats_are_detected_from_every_file_type(
    tmp_path: Path, suffix: str, rows: list[dict], fmt: str
) -> None:
    path = write(tmp_path / f"data{suffix}", rows)
    data = read_data(DataConfig(path=str(path)))
    assert data.format == fmt and len(data.rows) == len(rows)
    first = data.rows[0]
    if fmt == "chat":
        assert first.messages == rows[0]["messages"]
    else:
        assert (first.prompt, first.completion) == (rows[0]["prompt"], rows[0]["completion"])


def test_sharegpt_conversations_become_messages(tmp_path: Path) -> None:
    row = {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]}
    data = read_data(DataConfig(path=str(write(tmp_path / "d.jsonl", [row]))))
    assert data.rows[0].messages == [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "yo"},
    ]


@pytest.mark.parametrize(
    ("row", "problem"),
    [
        ({"messages": "hello"}, "messages is a string, not a list"),
        ({"messages": []}, "messages must be a non-empty list"),
        ({"messages": [{"content": "hi"}]}, r"messages\[0\] has no role"),
        ({"messages": [{"role": "user", "content": 3}]}, r"messages\[0\] content must be a"),
        ({"messages": [{"role": "user"}]}, r"messages\[0\] \(user\) has no content"),
        (
            {"messages": [{"role": "assistant", "content": "x"}]},
            "the first message is the assistant",
        ),
        ({"prompt": "a"}, "needs prompt and completion"),
        ({"prompt": "a", "completion": ""}, "completion is empty"),
        ({"prompt": "a", "completion": [{"role": "assistant", "content": "b"}]}, "prompt and c"),
        ({"prompt": 1, "completion": 2}, "prompt and completion must be strings or message lists"),
    ],
)
def test_a_malformed_row_is_one_line_naming_file_and_row(
    tmp_path: Path, row: dict, problem: str
) -> None:
    good = chat_rows(2) if "messages" in row else pc_rows(2)
    path = write(tmp_path / "bad.jsonl", [*good, row])
    fmt = "chat" if "messages" in row else "prompt_completion"
    with pytest.raises(DataError, match=f"^bad.jsonl: line 3: {problem}") as err:
        read_data(DataConfig(path=str(path), format=fmt))
    assert "\n" not in str(err.value)


def test_malformed_rows_in_tables_are_named_by_row(tmp_path: Path) -> None:
    rows = [*pc_rows(3, conversational=True), {"prompt": "x", "completion": "y"}]
    path = tmp_path / "mixed.jsonl"
    write(path, rows)
    with pytest.raises(DataError, match="mixed.jsonl: line 4: prompt/completion are strings"):
        read_data(DataConfig(path=str(path)))
    bad = [{"messages": json.dumps(r["messages"])} for r in chat_rows(3)]
    bad[1]["messages"] = "[not json"
    with pytest.raises(DataError, match="bad.csv: row 2: messages is a string"):
        read_data(DataConfig(path=str(write(tmp_path / "bad.csv", bad))))


def test_a_bad_row_stops_the_cli_before_training(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write(tmp_path / "bad.jsonl", [*chat_rows(5), {"messages": [{"role": "user"}]}])
    code, _, err = run_cli(
        capsys,
        monkeypatch,
        "find",
        "studies/tiny.toml",
        "--set",
        f"data.path={path}",
        "--out",
        str(tmp_path / "out"),
        "-q",
    )
    assert code == 2
    assert "bad.jsonl: line 6: messages[0] (user) has no content" in err
    assert not (tmp_path / "out" / "rangetest.parquet").exists()


def test_chat_rows_without_an_assistant_turn_are_named_not_blamed_on_length(
    tmp_path: Path, tok: HFTokenizer
) -> None:
    # Every answer under a role the template renders but the loss mask does not know.
    rows = [
        {
            "messages": [
                {**m, "role": m["role"].replace("assistant", "model")} for m in r["messages"]
            ]
        }
        for r in chat_rows()
    ]
    path = write(tmp_path / "chat.jsonl", rows)
    with pytest.raises(
        DataError, match=r"40 chat rows have no 'assistant' message.*model, system, user"
    ):
        load_blocks(DataConfig(path=str(path), eval_blocks=2), TRAIN, tok, 0)
    # Trained on every token, they need none.
    assert load_blocks(DataConfig(path=str(path), eval_blocks=2, train_on="all"), TRAIN, tok, 0)


def test_config_keys_are_checked() -> None:
    for key, value, message in [
        ("format", "yaml", "data.format: must be auto, text, chat, prompt_completion"),
        ("train_on", "prompts", "data.train_on: must be answers, all, completions"),
    ]:
        with pytest.raises(ConfigError, match=message):
            tiny_config(f"data.{key}={value}")
    with pytest.raises(ConfigError, match="data.format: stdlib-instruct is chat or"):
        tiny_config("data.path=stdlib-instruct", "data.format=text")
    with pytest.raises(ConfigError, match="data.packing: must be true or false"):
        tiny_config("data.packing=3")


# --- templates and masks ----------------------------------------------------------------


def test_chat_needs_a_template(tmp_path: Path) -> None:
    path = write(tmp_path / "chat.jsonl", chat_rows())
    cfg = DataConfig(path=str(path), eval_blocks=2)
    with pytest.raises(DataError, match="byte tokenizer .* cannot render chats"):
        load_blocks(cfg, TRAIN, ByteTokenizer(), 0)
    bare = HFTokenizer(chat_tokenizer(template=None))
    with pytest.raises(DataError, match="has no chat template; set data.chat_template"):
        load_blocks(cfg, TRAIN, bare, 0)
    with pytest.raises(DataError, match="data.chat_template: .*nope.jinja does not exist"):
        load_blocks(DataConfig(path=str(path), chat_template="nope.jinja"), TRAIN, bare, 0)
    # A Jinja file makes it work; this one writes the role in capitals.
    jinja = tmp_path / "chat.jinja"
    jinja.write_text(CHATML.replace("message['role']", "message['role'].upper()"))
    blocks = load_blocks(
        DataConfig(path=str(path), chat_template=str(jinja), eval_blocks=2), TRAIN, bare, 0
    )
    text = bare.tokenizer.decode(blocks.train[[0]]["input_ids"][0])
    assert "<|im_start|>USER\n" in text and "<|im_start|>ASSISTANT\n" in text


def test_inline_template_and_template_errors_name_the_row(tmp_path: Path) -> None:
    bare = HFTokenizer(chat_tokenizer(template=None))
    strict = (
        "{% for m in messages %}{% if m['role'] == 'tool' %}{{ raise_exception('no tools') }}"
        "{% endif %}{% endfor %}" + CHATML
    )
    rows = chat_rows(6)
    rows[4]["messages"].insert(1, {"role": "tool", "content": "42"})
    path = write(tmp_path / "chat.jsonl", rows)
    with pytest.raises(DataError, match=r"chat.jsonl: line 5: the chat template refuses this row"):
        load_blocks(
            DataConfig(path=str(path), chat_template=strict, eval_blocks=1), TRAIN, bare, 0
        )
    del rows[4]
    path = write(tmp_path / "chat.jsonl", rows)
    blocks = load_blocks(
        DataConfig(path=str(path), chat_template=strict, eval_blocks=1), TRAIN, bare, 0
    )
    assert len(blocks.train) + len(blocks.eval) == 5


def test_text_files_cannot_be_chat(tmp_path: Path) -> None:
    path = tmp_path / "notes.txt"
    path.write_text("hello")
    with pytest.raises(DataError, match="data.format = chat but notes.txt is plain text"):
        read_data(DataConfig(path=str(path), format="chat"))


def test_answers_a_template_rewrites_later_are_left_out(
    tok: HFTokenizer, caplog: pytest.LogCaptureFixture
) -> None:
    # Like templates that drop reasoning from earlier turns: an assistant turn followed by
    # more conversation renders as "(earlier answer)".
    template = CHATML.replace(
        "message['content']",
        "('(earlier answer)' if message['role'] == 'assistant' and not loop.last "
        "else message['content'])",
    )
    renderer = Renderer(tok, DataConfig(chat_template=template))
    with caplog.at_level(logging.WARNING, logger="lrsweep.data"):
        encoded = renderer.encode(read_rows(chat_rows(4)), "test")
        renderer.warn("test")
    assert renderer.stats.unstable == 2 and renderer.stats.diverged == 0  # rows 0 and 3
    # Row 0 has two answers; only the last one renders as trained.
    assert tok.tokenizer.decode([t for t in encoded[0].labels if t != -100]) == "0<|im_end|>\n"
    assert "(earlier answer)" in tok.tokenizer.decode(encoded[0].input_ids)
    assert any("only the turns rendered" in r.getMessage() for r in caplog.records)


def test_chat_answers_are_the_assistant_turns_only(tok: HFTokenizer) -> None:
    renderer = Renderer(tok, DataConfig())
    rows = read_rows(chat_rows(4))
    encoded = renderer.encode(rows, "test")
    # Multi-turn row 0: both assistant turns with their end-of-turn token and newline.
    answers = tok.tokenizer.decode([t for t in encoded[0].labels if t != -100])
    assert answers == "It is 0.<|im_end|>\n0<|im_end|>\n"
    single = encoded[1]
    text = tok.tokenizer.decode(single.input_ids)
    assert text == (
        "<|im_start|>user\nWhat is 1 plus 1?<|im_end|>\n"
        "<|im_start|>assistant\nIt is 2.<|im_end|>\n"
    )
    trained = [i for i, t in enumerate(single.labels) if t != -100]
    assert tok.tokenizer.decode(single.input_ids[trained[0] :]) == "It is 2.<|im_end|>\n"
    assert trained == list(range(trained[0], len(single.input_ids)))
    # train_on = all: every token.
    everything = Renderer(tok, DataConfig(train_on="all")).encode(rows, "test")
    assert all(e.labels == e.input_ids for e in everything)


def test_conversational_prompt_completion_trains_the_completion(tok: HFTokenizer) -> None:
    encoded = Renderer(tok, DataConfig()).encode(read_rows(pc_rows(3, True)), "test")
    answer = tok.tokenizer.decode([t for t in encoded[2].labels if t != -100])
    assert answer == " 0 1 2 3<|im_end|>\n"


def test_plain_prompt_completion_trains_completion_and_eos() -> None:
    byte = ByteTokenizer()
    encoded = Renderer(byte, DataConfig()).encode(read_rows(pc_rows(3)), "test")
    example = encoded[1]
    assert example.input_ids == [*b"Count to 3: 0 1 2", byte.eos_token_id]
    assert example.labels == [-100] * len(b"Count to 3:") + [*b" 0 1 2", byte.eos_token_id]


def read_rows(rows: list[dict]) -> list:
    from lrsweep.data.reading import parse_row

    fmt = "chat" if "messages" in rows[0] else "prompt_completion"
    return [parse_row(r, f"row {i}", fmt, "test") for i, r in enumerate(rows, 1)]


# --- sequences ----------------------------------------------------------------------------


def test_truncation_and_empty_rows_are_counted(
    tmp_path: Path, tok: HFTokenizer, caplog: pytest.LogCaptureFixture
) -> None:
    rows = chat_rows(30)
    rows[5]["messages"] = [{"role": "user", "content": "no answer here"}]
    rows[7]["messages"][0]["content"] = "long question " * 40  # the answer is cut off
    rows[8]["messages"][-1]["content"] = "long answer " * 40  # truncated, kept
    path = write(tmp_path / "chat.jsonl", rows)
    with caplog.at_level(logging.WARNING, logger="lrsweep.data"):
        blocks = load_blocks(
            DataConfig(path=str(path), eval_blocks=3),
            TrainConfig(seq_len=140, batch_size=2),
            tok,
            0,
        )
    assert len(blocks.train) + len(blocks.eval) == 28
    assert max(len(ids) for ids in blocks.train.input_ids + blocks.eval.input_ids) <= 140
    said = [r.getMessage() for r in caplog.records]
    assert [m for m in said if "were cut" in m] == [
        "data chat.jsonl: 2 of 30 rows are longer than train.seq_len = 140 tokens and were cut; "
        "1 rows had no answer token left and were dropped"
    ]
    assert [m for m in said if "no 'assistant' message" in m] == [
        "data chat.jsonl: 1 chat rows have no 'assistant' message to train on (their roles: "
        "user) and were dropped; name the answers' role 'assistant', or set data.train_on = 'all'"
    ]


def test_batches_are_padded_to_the_longest_with_masks(tmp_path: Path, tok: HFTokenizer) -> None:
    path = write(tmp_path / "chat.jsonl", chat_rows())
    blocks = load_blocks(DataConfig(path=str(path), eval_blocks=4), TRAIN, tok, 0)
    assert isinstance(blocks.train, Examples) and blocks.format == "chat"
    assert len(blocks.eval) == 4 and len(blocks.train) == 36
    batch = next(batches(blocks.train, 4, seed=0))
    lengths = batch["attention_mask"].sum(1)
    assert batch["input_ids"].shape == (4, int(lengths.max()))
    assert (batch["labels"][batch["attention_mask"] == 0] == -100).all()
    assert (batch["input_ids"][batch["attention_mask"] == 0] == tok.tokenizer.pad_token_id).all()
    # Same seed, same batches; the probe's slice is a smaller set of examples.
    again = next(batches(blocks.train, 4, seed=0))
    assert all(torch.equal(batch[k], again[k]) for k in batch)
    assert isinstance(blocks.eval[:2], Examples) and len(blocks.eval[:2]) == 2


def test_split_is_by_example_and_seeded(tmp_path: Path, tok: HFTokenizer) -> None:
    path = write(tmp_path / "chat.jsonl", chat_rows())

    def questions(examples: Examples) -> set[str]:
        texts = [tok.tokenizer.decode(ids) for ids in examples.input_ids]
        return {re.search(r"What is (\d+) plus", text).group(1) for text in texts}

    a = load_blocks(DataConfig(path=str(path), eval_blocks=5), TRAIN, tok, 1)
    b = load_blocks(DataConfig(path=str(path), eval_blocks=5), TRAIN, tok, 1)
    c = load_blocks(DataConfig(path=str(path), eval_blocks=5), TRAIN, tok, 2)
    assert not questions(a.eval) & questions(a.train)
    assert questions(a.eval) == questions(b.eval) != questions(c.eval)
    assert len(questions(a.eval) | questions(a.train)) == 40


def _tiny_chat(chat_model_dir: Path) -> LlamaForCausalLM:
    model = LlamaForCausalLM.from_pretrained(chat_model_dir)
    model.config.use_cache = False  # as lrsweep's loader sets it
    return model


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_packed_examples_do_not_attend_to_each_other(
    chat_model_dir: Path, tok: HFTokenizer, attn: str
) -> None:
    model = _tiny_chat(chat_model_dir)
    model.config._attn_implementation = attn
    encoded = trim(
        Renderer(tok, DataConfig(train_on="all")).encode(read_rows(chat_rows(12)), ""), 256
    )
    packed = pack(encoded.examples, 200, tok.tokenizer.pad_token_id)
    unpacked = to_examples(encoded.examples, tok.tokenizer.pad_token_id)
    assert len(packed) < len(unpacked) and max(packed.lengths()) <= 200
    assert sum(packed.lengths()) == sum(unpacked.lengths())
    assert packed.trained_tokens() == unpacked.trained_tokens()
    # Same token-weighted loss packed or not: no example sees another one.
    loss_packed = evaluate(model, packed, 3, CPU)
    loss_unpacked = evaluate(model, unpacked, 3, CPU)
    assert loss_packed == pytest.approx(loss_unpacked, rel=1e-5)
    # Without restarting positions, packing changes the loss (the test can fail).
    batch = packed[[0]]
    leaky = {"input_ids": batch["input_ids"], "labels": batch["labels"]}
    isolated = model(**batch).loss
    assert not torch.allclose(model(**leaky).loss, isolated, rtol=1e-4)


def test_loss_is_token_weighted_across_micro_batches_and_accumulation(
    chat_model_dir: Path, tok: HFTokenizer
) -> None:
    from peft import LoraConfig, get_peft_model

    rows = chat_rows(4)
    rows[1]["messages"][-1]["content"] = "a much longer answer than the others " * 3
    examples = to_examples(
        trim(Renderer(tok, DataConfig()).encode(read_rows(rows), ""), 256).examples,
        tok.tokenizer.pad_token_id,
    )
    counts = [int((e[1:] != -100).sum()) for e in examples.labels]
    assert len(set(counts)) > 1  # uneven micro-batches, or the test proves nothing

    def step(batch_size: int, grad_accum: int) -> tuple[float, list[torch.Tensor]]:
        torch.manual_seed(0)
        config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
        model = get_peft_model(_tiny_chat(chat_model_dir), config)
        params = [p for p in model.parameters() if p.requires_grad]
        for p in params:  # B != 0, so that every LoRA weight gets a gradient
            torch.nn.init.normal_(p, std=0.02)
        optimizer = torch.optim.SGD(params, lr=1.0)
        before = [p.detach().clone() for p in params]
        micro = [examples[list(range(i, i + batch_size))] for i in range(0, 4, batch_size)]
        result = train(
            model,
            optimizer,
            iter(micro),
            [1.0],
            Loop(CPU, grad_accum, 0.0),
            progress=False,
        )
        return result.records[0].loss, [b - p.detach() for b, p in zip(before, params)]

    loss_one, grads_one = step(4, 1)
    loss_acc, grads_acc = step(1, 4)
    assert loss_acc == pytest.approx(loss_one, rel=1e-6)
    for a, b in zip(grads_one, grads_acc, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)
    # That is the mean over answer tokens; the mean of per-example means differs.
    model = _tiny_chat(chat_model_dir)
    full = model(**examples[[0, 1, 2, 3]]).loss.item()
    per_example = [model(**examples[[i]]).loss.item() for i in range(4)]
    weighted = sum(loss * n for loss, n in zip(per_example, counts, strict=True)) / sum(counts)
    assert full == pytest.approx(weighted, rel=1e-6)
    assert abs(full - sum(per_example) / 4) > 1e-5 * full


# --- the stdlib-instruct task -------------------------------------------------------------


def test_stdlib_instruct_rows_from_a_module(tmp_path: Path) -> None:
    source = tmp_path / "m.py"
    source.write_text(
        "def add(a, b):\n"
        '    """Add two numbers."""\n'
        "    total = a + b\n"
        "    return total\n\n"
        "def stub():\n"
        '    """Nothing."""\n'
        "    pass\n\n"
        "def _private():\n"
        '    """Hidden."""\n'
        "    return 1\n\n"
        "class Box:\n"
        "    @property\n"
        "    def size(self):\n"
        '        """The size."""\n'
        "        return len(self.items)\n"
    )
    rows = stdlib_instruct.module_rows(source, "m")
    assert rows == [
        {
            "module": "m",
            "cls": "",
            "code": 'def add(a, b):\n    """Add two numbers."""',
            "body": "    total = a + b\n    return total",
        },
        {
            "module": "m",
            "cls": "Box",
            "code": '@property\ndef size(self):\n    """The size."""',
            "body": "    return len(self.items)",
        },
    ]


def test_stdlib_instruct_is_deterministic_and_well_formed() -> None:
    chat, plain = stdlib_instruct.rows("chat"), stdlib_instruct.rows("prompt_completion")
    assert len(chat) == len(plain) > 1000
    assert [r.messages for r in chat[:50]] == [
        r.messages for r in stdlib_instruct.rows("chat")[:50]
    ]
    functions = stdlib_instruct.functions()
    assert len({f["code"] for f in functions}) == len(functions)  # no duplicates
    first = functions[0]
    user, assistant = chat[0].messages
    assert first["code"] in user["content"] and assistant["content"].count(first["body"]) == 1
    assert (
        plain[0].prompt.endswith(first["code"])
        and plain[0].completion.strip() == first["body"].strip()
    )


def test_stdlib_instruct_on_the_byte_tokenizer_is_prompt_completion() -> None:
    cfg = DataConfig(path="stdlib-instruct", max_tokens=20000, eval_blocks=4)
    blocks = load_blocks(cfg, TrainConfig(seq_len=128, batch_size=4), ByteTokenizer(), 0)
    assert blocks.format == "prompt_completion" and blocks.source == "stdlib-instruct"
    assert len(blocks.eval) == 4 and len(blocks.train) >= 4
    example = blocks.eval[[0]]
    text = bytes(t for t in example["input_ids"][0].tolist() if t < 256).decode()
    answer = bytes(t for t in example["labels"][0].tolist() if 0 <= t < 256).decode()
    assert text.startswith("# ") and '"""' in text and text.endswith(answer)


# --- end to end -------------------------------------------------------------------------


def _study(tmp_path: Path, model: Path, data: Path, *extra: str) -> Path:
    study = tmp_path / "study.toml"
    study.write_text(
        (Path(__file__).parents[2] / "studies" / "tiny.toml")
        .read_text()
        .replace('path = "tiny"', f'path = "{model}"')
        .replace('path = "stdlib"', f'path = "{data}"')
        .replace("seq_len = 32", "seq_len = 96")
        + "\n".join(extra)
    )
    return study


def test_find_and_sweep_run_on_chat_and_prompt_completion(
    tmp_path: Path,
    chat_model_dir: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    chat = write(tmp_path / "chat.jsonl", chat_rows(60))
    study = _study(tmp_path, chat_model_dir, chat)
    code, out, err = run_cli(
        capsys, monkeypatch, "find", str(study), "--out", str(tmp_path / "f"), "-q"
    )
    assert code == 0, err
    assert (tmp_path / "f" / "rangetest.parquet").exists()
    code, out, err = run_cli(
        capsys,
        monkeypatch,
        "sweep",
        str(study),
        "--out",
        str(tmp_path / "s"),
        "--trials",
        "2",
        "-q",
    )
    assert code == 0, err
    parquet = write(tmp_path / "pc.parquet", pc_rows(60, conversational=True))
    study = _study(tmp_path, chat_model_dir, parquet)
    code, out, err = run_cli(
        capsys,
        monkeypatch,
        "find",
        str(study),
        "--set",
        "data.packing=true",
        "--out",
        str(tmp_path / "p"),
        "-q",
    )
    assert code == 0, err
