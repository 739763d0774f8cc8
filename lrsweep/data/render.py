"""Rendering instruction rows into token ids and labels, with the loss on the answers only.

Conversational rows are rendered with the tokenizer's own chat template (or
``data.chat_template``) and tokenised without special tokens, as ``apply_chat_template`` does.
The answer tokens are found without ``{% generation %}`` markers, which most templates lack,
the way TRL finds a completion: for each assistant turn, the conversation before it rendered
with the generation prompt is its context, and the conversation through it is the context
plus the answer. The answer is the token span between the two inside the tokenised whole
conversation (where a tokenised prefix is not a prefix of the whole, the span starts where
they diverge, as TRL's ``common_prefix_length``). So an answer holds what the model writes
after the generation prompt, end-of-turn token included, and whatever the template puts
before the next turn (ChatML's newline), as in TRL's completion masks.

Plain prompt-completion strings are tokenised as TRL tokenises them: ``prompt`` and
``prompt + completion + eos`` (with the tokenizer's special tokens), the completion being what
follows their common prefix.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lrsweep.errors import DataError, first_line


if TYPE_CHECKING:
    from lrsweep.config import DataConfig
    from lrsweep.data.reading import Row
    from lrsweep.models import Tokenizer

logger = logging.getLogger(__name__)
IGNORE = -100


@dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int]


@dataclass
class RenderStats:
    diverged: int = 0  # rows where a tokenised prompt was not a prefix of the whole
    unstable: int = 0  # rows where an earlier answer renders differently later (not trained)
    no_assistant: int = 0  # chat rows with no assistant message (answers-only: dropped)
    roles: set[str] = field(default_factory=set)  # the roles those rows have


def common_prefix_length(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


def load_template(value: str) -> str | None:
    """``data.chat_template``: empty (the tokenizer's own), a Jinja file, or the template."""
    if not value:
        return None
    if "{%" in value or "{{" in value:
        return value
    path = Path(value).expanduser()
    if not path.is_file():
        raise DataError(f"data.chat_template: {path} does not exist; give a Jinja file")
    return path.read_text(encoding="utf-8")


def hf_tokenizer(tokenizer: Tokenizer) -> Any:
    """The transformers tokenizer behind lrsweep's wrapper, or None (the byte tokenizer)."""
    return getattr(tokenizer, "tokenizer", None)


class Renderer:
    """Turns rows into :class:`Encoded` examples; labels are ``IGNORE`` outside the answers
    (``train_on = "answers"``; ``"completions"`` on prompt-completion rows only) or nowhere
    (``"all"``)."""

    def __init__(self, tokenizer: Tokenizer, config: DataConfig) -> None:
        self.tokenizer = tokenizer
        self.hf = hf_tokenizer(tokenizer)
        self.train_on = config.train_on
        self.template = load_template(config.chat_template)
        self.stats = RenderStats()

    def can_chat(self) -> bool:
        return self.hf is not None and bool(self.template or self.hf.chat_template)

    def check_chat(self, source: str) -> None:
        if self.hf is None:
            raise DataError(
                f"data: {source} is chat data, but the model's byte tokenizer (the tiny test "
                "model) cannot render chats; use a Hugging Face model, or prompt/completion "
                "strings"
            )
        if not self.can_chat():
            raise DataError(
                f"data: {source} is chat data, but the model's tokenizer has no chat template; "
                "set data.chat_template to a Jinja file (e.g. the one of the model's instruct "
                "version), or use prompt/completion strings"
            )

    def encode(self, rows: list[Row], source: str) -> list[Encoded]:
        if not rows:
            return []
        if rows[0].conversational:
            self.check_chat(source)
            return self._chat(rows, source)
        return self._plain(rows)

    def _tokenize(self, texts: list[str], special: bool) -> list[list[int]]:
        if self.hf is None:
            return self.tokenizer.encode_batch(texts)
        out: list[list[int]] = []
        for i in range(0, len(texts), 512):  # chunks bound the memory of one call
            chunk = self.hf(texts[i : i + 512], add_special_tokens=special, verbose=False)
            out.extend(list(ids) for ids in chunk["input_ids"])
        return out

    def _plain(self, rows: list[Row]) -> list[Encoded]:
        eos_text = getattr(self.hf, "eos_token", None) if self.hf is not None else None
        prompts = [str(r.prompt) for r in rows]
        fulls = []
        for row in rows:
            completion = str(row.completion)
            if eos_text and not completion.endswith(eos_text):
                completion += eos_text
            fulls.append(str(row.prompt) + completion)
        prompt_ids = self._tokenize(prompts, special=True)
        full_ids = self._tokenize(fulls, special=True)
        if self.hf is None or not eos_text:  # no EOS text to append: append its id
            full_ids = [ids + [self.tokenizer.eos_token_id] for ids in full_ids]
        out = []
        for row, p_ids, ids in zip(rows, prompt_ids, full_ids, strict=True):
            start = common_prefix_length(p_ids, ids)
            self.stats.diverged += start < len(p_ids)
            spans = [(start, len(ids))] if self._answers(row) else None
            out.append(Encoded(ids, self._labels(ids, spans)))
        return out

    def _answers(self, row: Row) -> bool:
        """Whether the row's loss is on its answers only (TRL's default, ``completions``,
        trains a prompt-completion row on its completion, a messages row on every token)."""
        return self.train_on == "answers" or (
            self.train_on == "completions" and row.messages is None
        )

    def _labels(self, ids: list[int], spans: list[tuple[int, int]] | None) -> list[int]:
        """The labels of ``ids``: the answer ``spans``, or every token where None."""
        if spans is None:
            return list(ids)
        labels = [IGNORE] * len(ids)
        for start, end in spans:
            labels[start:end] = ids[start:end]
        return labels

    def _render(self, row: Row, messages: list[dict[str, Any]], source: str, gen: bool) -> str:
        try:
            return self.hf.apply_chat_template(
                messages,
                tokenize=False,
                add_generation_prompt=gen,
                chat_template=self.template,
                tools=row.tools,
                **row.template_kwargs,
            )
        except Exception as err:  # jinja2 raises its own errors, templates raise anything
            raise DataError(
                f"{source}: {row.where}: the chat template refuses this row ({first_line(err)})"
            ) from None

    def _chat(self, rows: list[Row], source: str) -> list[Encoded]:
        texts: list[str] = []
        # per row: index of its full text, and per answer (prompt text index, through index
        # or None when the answer runs to the end)
        plans: list[tuple[int, list[tuple[int, int | None]] | None]] = []
        for row in rows:
            if row.messages is not None:
                messages = row.messages
                turns = [k for k, m in enumerate(messages) if m["role"] == "assistant"]
            else:
                messages = [*row.prompt, *row.completion]  # type: ignore[misc]
                turns = [len(row.prompt)]  # type: ignore[arg-type]
            texts.append(self._render(row, messages, source, gen=False))
            full = len(texts) - 1
            answers: list[tuple[int, int | None]] | None = None
            if self._answers(row):
                if not turns:  # nothing to train on: dropped, counted
                    self.stats.no_assistant += 1
                    self.stats.roles.update(m["role"] for m in messages)
                answers = []
                for k in turns:
                    texts.append(self._render(row, messages[:k], source, gen=True))
                    prompt = len(texts) - 1
                    through = None
                    last = row.messages is None or k == len(messages) - 1
                    if not last:
                        texts.append(self._render(row, messages[: k + 1], source, gen=False))
                        through = len(texts) - 1
                    answers.append((prompt, through))
            plans.append((full, answers))
        ids_of = self._tokenize(texts, special=False)
        out = []
        for full, answers in plans:
            ids = ids_of[full]
            if answers is None:
                out.append(Encoded(ids, self._labels(ids, None)))
                continue
            spans = []
            diverged = unstable = False
            for prompt, through in answers:
                start = common_prefix_length(ids_of[prompt], ids)
                diverged |= start < len(ids_of[prompt])
                end = len(ids)
                if through is not None:
                    end = common_prefix_length(ids_of[through], ids)
                    if end < len(ids_of[through]):
                        unstable = True  # this answer renders differently once others follow
                        continue
                spans.append((start, end))
            self.stats.diverged += diverged
            self.stats.unstable += unstable
            out.append(Encoded(ids, self._labels(ids, spans)))
        return out

    def no_assistant_note(self) -> str:
        roles = ", ".join(sorted(self.stats.roles))
        return (
            f"{self.stats.no_assistant} chat rows have no 'assistant' message to train on "
            f"(their roles: {roles}) and were dropped; name the answers' role 'assistant', "
            "or set data.train_on = 'all'"
        )

    def warn(self, source: str) -> None:
        if self.stats.no_assistant:
            logger.warning("data %s: %s", source, self.no_assistant_note())
        if self.stats.diverged:
            logger.warning(
                "data %s: in %d rows the tokenised prompt is not a prefix of the tokenised "
                "example (the template renders it differently, or tokens merge across the "
                "boundary); their answers start where the two diverge, as in TRL",
                source,
                self.stats.diverged,
            )
        if self.stats.unstable:
            logger.warning(
                "data %s: in %d rows the chat template renders an earlier assistant turn "
                "differently once the conversation goes on (e.g. it drops reasoning); only "
                "the turns rendered as in the whole conversation are trained",
                source,
                self.stats.unstable,
            )
