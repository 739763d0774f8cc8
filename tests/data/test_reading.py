from __future__ import annotations

import json
import re
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pytest
import torch

from lrsweep.config import DataConfig, TrainConfig
from lrsweep.data import batches, load_blocks, read_documents, stdlib_files
from lrsweep.errors import DataError
from lrsweep.models import ByteTokenizer


TRAIN = TrainConfig(seq_len=16, batch_size=2)
TOK = ByteTokenizer()


def _docs(n: int = 40) -> list[str]:
    return [f"document {i}: " + "lorem ipsum dolor sit amet " * (5 + i % 7) for i in range(n)]


def test_stdlib_corpus_leaves_out_site_packages_and_tests() -> None:
    files = stdlib_files()
    assert len(files) > 100
    names = {p.name for p in files}
    assert {"os.py", "json/__init__.py".split("/")[1]} <= names
    for path in files:
        parts = set(path.parts)
        assert not parts & {"site-packages", "test", "tests", "idle_test", "pydoc_data"}, path


def test_stdlib_blocks_are_capped() -> None:
    cfg = DataConfig(max_tokens=5000, eval_blocks=4)
    blocks = load_blocks(cfg, TRAIN, TOK, seed=0)
    assert blocks.train.shape[1] == 16 and blocks.eval.shape == (4, 16)
    assert blocks.train.numel() + blocks.eval.numel() <= 5000 + 16


def test_one_huge_document_is_cut_before_it_is_tokenised(tmp_path: Path) -> None:
    class Counting(ByteTokenizer):
        chars = 0

        def encode_batch(self, texts: list[str]) -> list[list[int]]:
            Counting.chars += sum(map(len, texts))
            return super().encode_batch(texts)

    path = tmp_path / "big.txt"
    path.write_text("0123456789 " * 1_000_000)  # 11 MB, one document
    blocks = load_blocks(
        DataConfig(path=str(path), max_tokens=5000, eval_blocks=4), TRAIN, Counting(), 0
    )
    assert blocks.train.numel() + blocks.eval.numel() >= 4000  # the cap is still reached
    assert Counting.chars <= 2 * 3 * 5000  # not 11 million


def test_split_is_by_document(tmp_path: Path) -> None:
    # Each document repeats its own tag, so a block tells which document it came from.
    docs = [f"<{i:03d}>" * 20 for i in range(30)]
    path = _write(tmp_path, "jsonl", docs)
    blocks = load_blocks(DataConfig(path=str(path), eval_blocks=4), TRAIN, TOK, seed=0)

    def tags(rows: torch.Tensor) -> set[str]:
        text = bytes(t for t in rows.flatten().tolist() if t < 256).decode()
        return set(re.findall(r"<(\d{3})>", text))

    assert tags(blocks.eval) and not tags(blocks.eval) & tags(blocks.train)


def test_split_is_deterministic_per_seed() -> None:
    cfg = DataConfig(max_tokens=5000, eval_blocks=4)
    a, b = load_blocks(cfg, TRAIN, TOK, seed=1), load_blocks(cfg, TRAIN, TOK, seed=1)
    c = load_blocks(cfg, TRAIN, TOK, seed=2)
    assert torch.equal(a.train, b.train) and torch.equal(a.eval, b.eval)
    assert not torch.equal(a.eval, c.eval)


def _write(tmp_path: Path, kind: str, docs: list[str], field: str = "text") -> Path:
    if kind == "txt":
        path = tmp_path / "corpus.txt"
        path.write_text("\n\n".join(docs))
    elif kind == "jsonl":
        path = tmp_path / "corpus.jsonl"
        path.write_text("\n".join(json.dumps({field: d, "id": i}) for i, d in enumerate(docs)))
    elif kind == "json":
        path = tmp_path / "corpus.json"
        path.write_text(json.dumps([{field: d} for d in docs]))
    elif kind == "parquet":
        path = tmp_path / "corpus.parquet"
        pd.DataFrame({field: docs}).to_parquet(path)
    elif kind == "csv":
        path = tmp_path / "corpus.csv"
        pd.DataFrame({field: docs}).to_csv(path, index=False)
    elif kind == "arrow":
        # The layout of datasets' save_to_disk: Arrow IPC stream files in a folder.
        path = tmp_path / "saved"
        path.mkdir()
        table = pa.table({field: docs})
        with pa.OSFile(str(path / "data-00000-of-00001.arrow"), "wb") as sink:
            with pa.ipc.new_stream(sink, table.schema) as writer:
                writer.write_table(table)
        (path / "dataset_info.json").write_text("{}")
    else:
        raise AssertionError(kind)
    return path


@pytest.mark.parametrize("kind", ["txt", "jsonl", "json", "parquet", "csv", "arrow"])
def test_local_formats_give_the_same_text(tmp_path: Path, kind: str) -> None:
    docs = _docs()
    path = _write(tmp_path, kind, docs, field="body")
    read, _ = read_documents(DataConfig(path=str(path), text_field="body"))
    if kind == "txt":
        assert read == ["\n\n".join(docs)]
    else:
        assert read == docs
    blocks = load_blocks(
        DataConfig(path=str(path), text_field="body", eval_blocks=2), TRAIN, TOK, seed=0
    )
    assert len(blocks.eval) == 2 and len(blocks.train) >= 2


@pytest.mark.parametrize(
    ("kind", "message"),
    [
        ("missing", "does not exist"),
        ("relative", "does not exist"),  # not read as the Hub dataset "no-such-dir/x.jsonl"
        ("empty", "holds no text"),
        ("field", "no record has the text field 'text'"),
        ("parquet-field", "no text field 'text'"),
        ("tiny", "too little text"),
        ("suffix", "unsupported file type"),
        ("badjson", "not valid JSON"),
        ("mixed", "x.jsonl: line 2: 'text' is not text (got NoneType)"),
        ("utf16", "not UTF-8 text"),
        ("dotted", "does not exist"),  # ./name is a local path, never a Hub ID
        ("nothing", "x.jsonl holds no rows"),
    ],
)
def test_bad_data_gives_one_clear_error(tmp_path: Path, kind: str, message: str) -> None:
    path = tmp_path / "x.txt"
    if kind == "empty":
        path.write_text("  \n")
    elif kind == "field":
        path = tmp_path / "x.jsonl"
        path.write_text(json.dumps({"content": "hello"}) + "\n")
    elif kind == "parquet-field":
        path = _write(tmp_path, "parquet", _docs(), field="content")
    elif kind == "tiny":
        path.write_text("just a few words")
    elif kind == "suffix":
        path = tmp_path / "x.docx"
        path.write_text("hello")
    elif kind == "badjson":
        path = tmp_path / "x.json"
        path.write_text("[{oops")
    elif kind == "relative":
        path = Path("no-such-dir/x.jsonl")
    elif kind == "mixed":  # the second record names its text otherwise: not dropped silently
        path = tmp_path / "x.jsonl"
        path.write_text(json.dumps({"text": "a " * 500}) + "\n" + json.dumps({"content": "b"}))
    elif kind == "utf16":
        path.write_text(" ".join(_docs()), encoding="utf-16")
    elif kind == "nothing":
        path = tmp_path / "x.jsonl"
        path.write_text("\n")
    elif kind == "dotted":
        path = Path("./no-such-data")
    with pytest.raises(DataError, match=re.escape(message)) as err:
        load_blocks(DataConfig(path=str(path), eval_blocks=2), TRAIN, TOK, seed=0)
    assert "\n" not in str(err.value)


def test_batches_cycle_epochs_in_a_seeded_order() -> None:
    blocks = torch.arange(10 * 4).view(10, 4)
    first = [b.clone() for _, b in zip(range(12), batches(blocks, 3, seed=0), strict=False)]
    again = [b.clone() for _, b in zip(range(12), batches(blocks, 3, seed=0), strict=False)]
    assert all(torch.equal(x, y) for x, y in zip(first, again, strict=True))
    # One epoch (3 batches of 3) never repeats a block.
    epoch = torch.cat(first[:3])[:, 0].tolist()
    assert len(set(epoch)) == 9


def test_a_saved_dataset_dict_is_read_by_its_train_split(tmp_path: Path) -> None:
    import datasets

    train = datasets.Dataset.from_dict({"text": _docs()})
    test = datasets.Dataset.from_dict({"text": ["held out " * 50] * 10})
    datasets.DatasetDict({"train": train, "test": test}).save_to_disk(tmp_path / "dd")
    # map() caches its output beside the saved files: they are not part of the data.
    datasets.load_from_disk(tmp_path / "dd" / "train").map(lambda r: {"text": r["text"] * 2})
    assert list((tmp_path / "dd" / "train").glob("cache-*.arrow"))
    assert read_documents(DataConfig(path=str(tmp_path / "dd")))[0] == _docs()
    datasets.DatasetDict({"test": test}).save_to_disk(tmp_path / "only")
    with pytest.raises(DataError, match=r"splits \['test'\] and no 'train'"):
        read_documents(DataConfig(path=str(tmp_path / "only")))


def test_csv_cells_are_text_and_a_bom_is_no_error(tmp_path: Path) -> None:
    from lrsweep.data.reading import read_data

    rows = [{"prompt": "2+2=", "completion": 4}, {"prompt": "A list?", "completion": "[1, 2]"}]
    pd.DataFrame(rows).to_csv(tmp_path / "qa.csv", index=False)
    read = read_data(DataConfig(path=str(tmp_path / "qa.csv")))
    assert [(r.prompt, r.completion) for r in read.rows] == [("2+2=", "4"), ("A list?", "[1, 2]")]
    bom = tmp_path / "qa.jsonl"
    bom.write_text("".join(json.dumps(r) + "\n" for r in rows[1:]), encoding="utf-8-sig")
    assert read_data(DataConfig(path=str(bom))).rows[0].completion == "[1, 2]"
