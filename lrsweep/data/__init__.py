"""Corpora and instruction data: reading, tokenisation, sequences and the train/eval split.

Text (``data.format = "text"``, the ``stdlib`` corpus): documents are split into train and
eval by document (a seeded permutation), so that no file leaks into both; each side is then
packed into blocks of ``seq_len`` tokens, documents separated by EOS. All blocks are full, so a
batch's mean loss is already token-weighted; ``Blocks.train`` and ``Blocks.eval`` are tensors.

Instruction data (``chat``, ``prompt_completion``, the ``stdlib-instruct`` task): rows are
split by example (seeded), rendered with the chat template, labelled on their answers only
(:mod:`.render`) and kept one example per sequence, or packed without attending to each other
(:mod:`.sequences`); ``Blocks.train`` and ``Blocks.eval`` are :class:`Examples`.

Modules: :mod:`.reading` (files, formats, row checks), :mod:`.render` (chat templates, answer
masks), :mod:`.sequences` (truncation, packing, collation), :mod:`.stdlib_instruct` (the task).
"""

from __future__ import annotations

import logging
import random
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from lrsweep.data.reading import Data, read_data, stdlib_files
from lrsweep.data.render import Renderer
from lrsweep.data.sequences import Examples, pack, to_examples, trim
from lrsweep.errors import DataError


if TYPE_CHECKING:
    from lrsweep.config import DataConfig, TrainConfig
    from lrsweep.models import Tokenizer

__all__ = [
    "Blocks",
    "Examples",
    "batches",
    "load_blocks",
    "read_data",
    "read_documents",
    "stdlib_files",
]

logger = logging.getLogger(__name__)

STDLIB_INSTRUCT = "stdlib-instruct"
_CHARS_PER_TOKEN = 3  # a generous guess used only to stop reading text early


@dataclass
class Blocks:
    """The training and held-out sequences: int64 tensors of shape (n, seq_len) for text,
    :class:`Examples` for instruction data. ``format`` is what was read."""

    train: torch.Tensor | Examples
    eval: torch.Tensor | Examples
    source: str
    format: str = "text"


def read_documents(config: DataConfig) -> tuple[list[str], str]:
    """Return a text corpus as a list of documents (in a fixed order) and a short source name."""
    data = read_data(config)
    if data.format != "text":
        raise DataError(f"data.path: {data.source} holds {data.format} rows, not text")
    return data.documents, data.source


def load_blocks(config: DataConfig, train: TrainConfig, tokenizer: Tokenizer, seed: int) -> Blocks:
    """Read, tokenise (up to ``max_tokens``), split and batch-ready the data of ``config``."""
    if config.path == STDLIB_INSTRUCT:
        from lrsweep.data import stdlib_instruct

        fmt = config.format
        if fmt == "auto":
            fmt = "chat" if Renderer(tokenizer, config).can_chat() else "prompt_completion"
            logger.info("stdlib-instruct as %s rows", fmt)
        data = Data(fmt, STDLIB_INSTRUCT, rows=stdlib_instruct.rows(fmt))
    else:
        data = read_data(config)
    if data.format == "text":
        return _text_blocks(data.documents, data.source, config, train, tokenizer, seed)
    return _example_blocks(data, config, train, tokenizer, seed)


def _example_blocks(
    data: Data, config: DataConfig, train: TrainConfig, tokenizer: Tokenizer, seed: int
) -> Blocks:
    rows = list(data.rows)
    random.Random(seed).shuffle(rows)
    # Render rows in shuffled order until the token cap (a guess from their size first).
    budget_chars, chars, picked = config.max_tokens * _CHARS_PER_TOKEN, 0, 0
    while picked < len(rows) and chars < budget_chars:
        chars += rows[picked].chars()
        picked += 1
    renderer = Renderer(tokenizer, config)
    trimmed = trim(renderer.encode(rows[:picked], data.source), train.seq_len)
    renderer.warn(data.source)
    examples, total = [], 0
    for example in trimmed.examples:
        if total >= config.max_tokens:
            break
        examples.append(example)
        total += len(example.input_ids)
    cut_off = trimmed.empty - renderer.stats.no_assistant
    if trimmed.truncated or cut_off:
        logger.warning(
            "data %s: %d of %d rows are longer than train.seq_len = %d tokens and were cut; "
            "%d rows had no answer token left and were dropped",
            data.source,
            trimmed.truncated,
            picked,
            train.seq_len,
            cut_off,
        )
    n_eval = min(config.eval_blocks, len(examples) - 1)
    held_out, rest = examples[:n_eval], examples[n_eval:]
    pad_id = _pad_id(tokenizer)
    train_set = pack(rest, train.seq_len, pad_id) if config.packing else to_examples(rest, pad_id)
    eval_set = to_examples(held_out, pad_id)
    need = train.batch_size * train.grad_accum
    if len(train_set) < need or len(eval_set) < 1:
        what = "packed sequences" if config.packing else "training examples"
        # Packed, a longer seq_len makes fewer sequences; unpacked, it cuts off fewer answers.
        longer = "" if config.packing else ", raise train.seq_len"
        why = (
            renderer.no_assistant_note()
            if renderer.stats.no_assistant
            else f"add rows{longer}, or lower train.batch_size or data.eval_blocks"
        )
        raise DataError(
            f"data.path: too few examples with an answer: {len(train_set)} {what} and "
            f"{len(eval_set)} held out, need at least {need} and 1 (one optimizer step); {why}"
        )
    logger.info(
        "data %s (%s): %d train %s, %d held-out examples, %d + %d answer tokens",
        data.source,
        data.format,
        len(train_set),
        "packs" if config.packing else "examples",
        len(eval_set),
        train_set.trained_tokens(),
        eval_set.trained_tokens(),
    )
    return Blocks(train=train_set, eval=eval_set, source=data.source, format=data.format)


def _pad_id(tokenizer: Tokenizer) -> int:
    hf = getattr(tokenizer, "tokenizer", None)
    pad = getattr(hf, "pad_token_id", None)
    return int(pad) if pad is not None else tokenizer.eos_token_id


def _pack(docs: list[list[int]], seq_len: int, eos: int) -> torch.Tensor:
    stream = [tok for doc in docs for tok in (*doc, eos)]
    n = len(stream) // seq_len
    return torch.tensor(stream[: n * seq_len], dtype=torch.long).view(n, seq_len)


def _text_blocks(
    docs: list[str],
    source: str,
    config: DataConfig,
    train: TrainConfig,
    tokenizer: Tokenizer,
    seed: int,
) -> Blocks:
    order = list(range(len(docs)))
    random.Random(seed).shuffle(order)
    # Read documents in shuffled order until the token cap, tokenising in chunks.
    budget_chars = config.max_tokens * _CHARS_PER_TOKEN
    picked, chars = [], 0
    for i in order:
        # The document that reaches the cap is cut at twice the guess (its tokens still
        # reach the cap), so that a single 1 GB file is not tokenised whole.
        picked.append(docs[i][: 2 * budget_chars - chars])
        chars += len(docs[i])
        if chars >= budget_chars:
            break
    encoded = tokenizer.encode_batch(picked)
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
        eval_docs: list[list[int]] = []
        n = 0
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
            "and 1 (one optimizer step); add text, or lower train.seq_len, train.batch_size "
            "or data.eval_blocks"
        )
    logger.info(
        "corpus %s: %d train blocks, %d eval blocks of %d tokens",
        source,
        len(train_blocks),
        len(eval_blocks),
        train.seq_len,
    )
    return Blocks(train=train_blocks, eval=eval_blocks, source=source)


def batches(
    blocks: torch.Tensor | Examples, batch_size: int, seed: int
) -> Iterator[torch.Tensor | dict[str, torch.Tensor]]:
    """Endless micro-batches of ``batch_size`` sequences, reshuffled each epoch with a fixed
    seed, so that every run with the same seed sees the same data in the same order: tensors
    of packed text blocks, or collated dicts of instruction examples."""
    generator = torch.Generator().manual_seed(seed)
    epoch_len = len(blocks) // batch_size
    while True:
        perm = torch.randperm(len(blocks), generator=generator)
        for i in range(epoch_len):
            yield blocks[perm[i * batch_size : (i + 1) * batch_size]]
