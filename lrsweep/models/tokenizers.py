"""The tokenizers behind lrsweep's :class:`Tokenizer` protocol: the tiny model's bytes, and
any transformers tokenizer."""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

from transformers import PreTrainedTokenizerBase


# Marks a saved folder whose tokenizer is ByteTokenizer (it has no Hugging Face files).
BYTE_TOKENIZER_FILE = "lrsweep_byte_tokenizer.json"


class Tokenizer(Protocol):
    eos_token_id: int

    def encode_batch(self, texts: list[str]) -> list[list[int]]: ...


class ByteTokenizer:
    """UTF-8 bytes as ids 0..255 and eos 256: the tiny test model's vocabulary."""

    eos_token_id: int = 256
    vocab_size: int = 257

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [list(text.encode("utf-8")) for text in texts]

    def decode(self, ids: list[int]) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")

    def save_pretrained(self, folder: str | Path) -> None:
        (Path(folder) / BYTE_TOKENIZER_FILE).write_text('{"type": "byte"}\n')


class HFTokenizer:
    """A transformers tokenizer behind the :class:`Tokenizer` protocol."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase) -> None:
        self.tokenizer = tokenizer
        eos = tokenizer.eos_token_id
        if eos is None:
            eos = tokenizer.bos_token_id
        self.eos_token_id: int = int(eos) if eos is not None else 0
        self.vocab_size: int = len(tokenizer)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        if not texts:
            return []
        # verbose=False: whole documents are encoded and cut into blocks later, so the
        # "longer than the model's maximum length" warning is noise here.
        out = self.tokenizer(texts, add_special_tokens=False, verbose=False)
        return [list(ids) for ids in out["input_ids"]]

    def save_pretrained(self, folder: str | Path) -> None:
        self.tokenizer.save_pretrained(str(folder))
