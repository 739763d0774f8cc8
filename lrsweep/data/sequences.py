"""Instruction examples as training sequences: truncation, optional packing, collation.

One example per sequence by default, padded to the batch's longest with an attention mask
(labels ``-100`` on padding and on everything that is not an answer). With packing, several
examples share a sequence of at most ``train.seq_len`` tokens (best-fit decreasing, as TRL's
``bfd``); their position ids restart at 0 for each example and no attention mask is passed,
which transformers (5.x) reads as packed sequences: with eager and sdpa attention on every
device it builds a block-diagonal causal mask, and flash-attention uses the position ids the
same way, so examples never attend to each other. Padding of packed rows is a sequence of its
own. The first token of every example is never a target, so no example is trained to predict
its start from the example before it.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable
from dataclasses import dataclass
from typing import overload

import torch

from lrsweep.data.render import IGNORE, Encoded


@dataclass
class Examples:
    """Tokenised examples (or packs of them), one per training sequence.

    ``len`` is the number of sequences; ``examples[i:j]`` is another ``Examples``;
    ``examples[indices]`` (a list or tensor of ints) is a collated micro-batch: a dict of
    ``input_ids``, ``labels`` and ``attention_mask`` (unpacked) or ``position_ids`` (packed).
    """

    input_ids: list[torch.Tensor]
    labels: list[torch.Tensor]
    pad_id: int
    position_ids: list[torch.Tensor] | None = None  # packed: restart at 0 for each example

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def packed(self) -> bool:
        return self.position_ids is not None

    @overload
    def __getitem__(self, index: slice) -> Examples: ...
    @overload
    def __getitem__(
        self, index: int | Iterable[int] | torch.Tensor
    ) -> dict[str, torch.Tensor]: ...
    def __getitem__(
        self, index: int | slice | Iterable[int] | torch.Tensor
    ) -> Examples | dict[str, torch.Tensor]:
        if isinstance(index, slice):
            return Examples(
                self.input_ids[index],
                self.labels[index],
                self.pad_id,
                None if self.position_ids is None else self.position_ids[index],
            )
        if isinstance(index, int):
            return self.collate([index])
        if isinstance(index, torch.Tensor):
            index = index.tolist()
        return self.collate(list(index))

    def lengths(self) -> list[int]:
        return [len(ids) for ids in self.input_ids]

    def trained_tokens(self) -> int:
        """Predicted answer tokens: labels other than -100 past each sequence's first."""
        return sum(int((labels[1:] != IGNORE).sum()) for labels in self.labels)

    def collate(self, indices: list[int]) -> dict[str, torch.Tensor]:
        width = max(len(self.input_ids[i]) for i in indices)
        n = len(indices)
        input_ids = torch.full((n, width), self.pad_id, dtype=torch.long)
        labels = torch.full((n, width), IGNORE, dtype=torch.long)
        for row, i in enumerate(indices):
            length = len(self.input_ids[i])
            input_ids[row, :length] = self.input_ids[i]
            labels[row, :length] = self.labels[i]
        batch = {"input_ids": input_ids, "labels": labels}
        if self.position_ids is None:
            mask = torch.zeros((n, width), dtype=torch.long)
            for row, i in enumerate(indices):
                mask[row, : len(self.input_ids[i])] = 1
            batch["attention_mask"] = mask
        else:
            # Padding gets positions of its own (0, 1, ...): a separate sequence, never
            # attended to by the examples; its labels are -100.
            positions = torch.zeros((n, width), dtype=torch.long)
            for row, i in enumerate(indices):
                length = len(self.position_ids[i])
                positions[row, :length] = self.position_ids[i]
                positions[row, length:] = torch.arange(width - length)
            batch["position_ids"] = positions
        return batch

    def eval_batches(self, batch_size: int) -> list[dict[str, torch.Tensor]]:
        """The whole set in batches of ``batch_size``, grouped by length to cut padding (the
        token-weighted mean loss does not depend on the grouping)."""
        order = sorted(range(len(self)), key=lambda i: -len(self.input_ids[i]))
        return [self.collate(order[i : i + batch_size]) for i in range(0, len(order), batch_size)]


@dataclass
class Trimmed:
    examples: list[Encoded]
    truncated: int = 0  # rows longer than seq_len, cut to it
    empty: int = 0  # rows with no answer token (left), dropped


def trim(encoded: list[Encoded], seq_len: int) -> Trimmed:
    """Truncate every example to ``seq_len`` tokens (keeping its start, as TRL) and drop those
    with no trained token left; the first token is never a target."""
    out = Trimmed([])
    for example in encoded:
        ids, labels = example.input_ids, list(example.labels)
        if len(ids) > seq_len:
            out.truncated += 1
            ids, labels = ids[:seq_len], labels[:seq_len]
        if labels:
            labels[0] = IGNORE
        if all(label == IGNORE for label in labels):
            out.empty += 1
            continue
        out.examples.append(Encoded(ids, labels))
    return out


def to_examples(encoded: list[Encoded], pad_id: int) -> Examples:
    return Examples(
        [torch.tensor(e.input_ids, dtype=torch.long) for e in encoded],
        [torch.tensor(e.labels, dtype=torch.long) for e in encoded],
        pad_id,
    )


def pack(encoded: list[Encoded], seq_len: int, pad_id: int) -> Examples:
    """Best-fit decreasing: each example, longest first, goes into the fullest pack it fits."""
    order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i].input_ids))
    packs: list[list[int]] = []
    space: list[tuple[int, int]] = []  # sorted (room left, pack index)
    for i in order:
        need = len(encoded[i].input_ids)
        at = bisect.bisect_left(space, (need, -1))
        if at < len(space):
            room, p = space.pop(at)
        else:
            room, p = seq_len, len(packs)
            packs.append([])
        packs[p].append(i)
        bisect.insort(space, (room - need, p))
    input_ids, labels, positions = [], [], []
    for members in packs:
        input_ids.append(torch.tensor([t for i in members for t in encoded[i].input_ids]))
        labels.append(torch.tensor([t for i in members for t in encoded[i].labels]))
        positions.append(torch.cat([torch.arange(len(encoded[i].input_ids)) for i in members]))
    return Examples(input_ids, labels, pad_id, positions)
