"""Corpora, tokenisation, packing into fixed-length blocks, and the train/eval split.

Documents are split into train and eval by document (a seeded permutation), so that no file
leaks into both; each side is then packed into blocks of ``seq_len`` tokens, documents
separated by EOS. All blocks are full, so a batch's mean loss is already token-weighted.
"""

from __future__ import annotations

import json
import logging
import random
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from lrsweep.errors import DataError


if TYPE_CHECKING:
    from lrsweep.config import DataConfig, TrainConfig
    from lrsweep.models import Tokenizer

logger = logging.getLogger(__name__)

# Folders of the standard library that are not the library itself.
_STDLIB_SKIP = {"site-packages", "dist-packages", "test", "tests", "idle_test", "pydoc_data"}
_CHARS_PER_TOKEN = 3  # a generous guess used only to stop reading text early


@dataclass
class Blocks:
    """Packed token blocks: ``train`` and ``eval`` are int64 tensors of shape (n, seq_len)."""

    train: torch.Tensor
    eval: torch.Tensor
    source: str


def stdlib_files() -> list[Path]:
    """The standard library's own .py modules, without site-packages and test suites."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for path in root.rglob("*.py"):
        if not _STDLIB_SKIP.intersection(path.relative_to(root).parts[:-1]):
            files.append(path)
    return sorted(files)


def _read_table(path: Path, field: str) -> list[str]:
    import pyarrow as pa
    import pyarrow.csv
    import pyarrow.parquet as pq

    suffix = path.suffix.lower()
    try:
        if path.is_dir():
            arrows = sorted(path.rglob("*.arrow"))
            if not arrows:
                raise DataError(
                    f"{path}: a folder must be saved with datasets' save_to_disk (no .arrow files)"
                )
            tables = []
            for arrow in arrows:
                with pa.memory_map(str(arrow)) as source:
                    try:
                        tables.append(pa.ipc.open_stream(source).read_all())
                    except pa.ArrowInvalid:
                        tables.append(pa.ipc.open_file(source).read_all())
            table = pa.concat_tables(tables)
        elif suffix == ".parquet":
            table = pq.read_table(path)
        elif suffix == ".csv":
            table = pyarrow.csv.read_csv(path)
        else:
            raise AssertionError(suffix)
    except (pa.ArrowInvalid, OSError) as err:
        raise DataError(f"{path}: cannot read ({err})") from None
    if field not in table.column_names:
        raise DataError(
            f"{path}: no text field {field!r}; columns are {table.column_names}; "
            "set data.text_field"
        )
    return [t for t in table.column(field).to_pylist() if isinstance(t, str)]


def _read_json(path: Path, field: str) -> list[str]:
    text = path.read_text(encoding="utf-8", errors="replace")
    try:
        if path.suffix.lower() == ".jsonl" or not text.lstrip().startswith("["):
            records = [json.loads(line) for line in text.splitlines() if line.strip()]
        else:
            records = json.loads(text)
    except json.JSONDecodeError as err:
        raise DataError(f"{path}: not valid JSON ({err})") from None
    records = [r for r in records if isinstance(r, dict)]
    if records and not any(field in r for r in records):
        raise DataError(
            f"{path}: no record has the text field {field!r} (keys: {sorted(records[0])}); "
            "set data.text_field"
        )
    return [r[field] for r in records if isinstance(r.get(field), str)]


def read_documents(config: DataConfig) -> tuple[list[str], str]:
    """Return the corpus as a list of documents (in a fixed order) and a short source name."""
    if config.path == "stdlib":
        files = stdlib_files()
        return [p.read_text(encoding="utf-8", errors="replace") for p in files], "stdlib"
    path = Path(config.path).expanduser()
    if not path.exists():
        raise DataError(
            f"data.path: {path} does not exist; give a .txt, .jsonl, .json, "
            ".parquet, .csv file or a save_to_disk folder, or 'stdlib'"
        )
    suffix = path.suffix.lower()
    if path.is_dir() or suffix in (".parquet", ".csv"):
        docs = _read_table(path, config.text_field)
    elif suffix in (".jsonl", ".json"):
        docs = _read_json(path, config.text_field)
    elif suffix in (".txt", ".md", ".py", ""):
        docs = [path.read_text(encoding="utf-8", errors="replace")]
    else:
        raise DataError(
            f"data.path: unsupported file type {suffix!r}; use .txt, .jsonl, "
            ".json, .parquet, .csv or a save_to_disk folder"
        )
    docs = [d for d in docs if d.strip()]
    if not docs:
        raise DataError(f"data.path: {path} holds no text")
    return docs, path.name


def _pack(docs: list[list[int]], seq_len: int, eos: int) -> torch.Tensor:
    stream = [tok for doc in docs for tok in (*doc, eos)]
    n = len(stream) // seq_len
    return torch.tensor(stream[: n * seq_len], dtype=torch.long).view(n, seq_len)


def load_blocks(config: DataConfig, train: TrainConfig, tokenizer: Tokenizer, seed: int) -> Blocks:
    """Read, tokenise (up to ``max_tokens``), split by document and pack the corpus."""
    docs, source = read_documents(config)
    order = list(range(len(docs)))
    random.Random(seed).shuffle(order)
    # Read documents in shuffled order until the token cap, tokenising in chunks.
    budget_chars = config.max_tokens * _CHARS_PER_TOKEN
    picked, chars = [], 0
    for i in order:
        picked.append(i)
        chars += len(docs[i])
        if chars >= budget_chars:
            break
    encoded = tokenizer.encode_batch([docs[i] for i in picked])
    kept, total = [], 0
    for ids in encoded:
        if total >= config.max_tokens:
            break
        ids = ids[: config.max_tokens - total]
        kept.append(ids)
        total += len(ids) + 1
    eval_tokens = config.eval_blocks * train.seq_len
    if len(kept) >= 2:
        # Whole documents go to eval until it holds enough tokens, the rest to train.
        eval_docs, n = [], 0
        while kept and n < eval_tokens and len(eval_docs) < len(kept) - 1:
            doc = kept.pop()
            eval_docs.append(doc)
            n += len(doc) + 1
        train_docs = kept
    else:
        # One document: its tail becomes the eval set.
        ids = kept[0] if kept else []
        cut = max(0, len(ids) - eval_tokens)
        train_docs, eval_docs = [ids[:cut]], [ids[cut:]]
    train_blocks = _pack(train_docs, train.seq_len, tokenizer.eos_token_id)
    eval_blocks = _pack(eval_docs, train.seq_len, tokenizer.eos_token_id)[: config.eval_blocks]
    need = train.batch_size * train.grad_accum
    if len(train_blocks) < need or len(eval_blocks) < 1:
        raise DataError(
            f"data.path: too little text: {len(train_blocks)} training blocks of "
            f"{train.seq_len} tokens and {len(eval_blocks)} eval blocks, need at least {need} "
            "and 1 (one optimizer step); add text or lower train.seq_len / train.batch_size"
        )
    logger.info(
        "corpus %s: %d train blocks, %d eval blocks of %d tokens",
        source,
        len(train_blocks),
        len(eval_blocks),
        train.seq_len,
    )
    return Blocks(train=train_blocks, eval=eval_blocks, source=source)


def batches(blocks: torch.Tensor, batch_size: int, seed: int) -> Iterator[torch.Tensor]:
    """Endless micro-batches of ``batch_size`` blocks, reshuffled each epoch with a fixed seed,
    so that every run with the same seed sees the same data in the same order."""
    generator = torch.Generator().manual_seed(seed)
    epoch_len = len(blocks) // batch_size
    while True:
        perm = torch.randperm(len(blocks), generator=generator)
        for i in range(epoch_len):
            yield blocks[perm[i * batch_size : (i + 1) * batch_size]]
