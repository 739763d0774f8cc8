"""Set and remove top-level keys of a YAML or JSON config in its own text, leaving every other
byte as it was (comments, order, quoting, blank lines), so that a user's file comes back with
only the schedule changed.

YAML: the training configs of transformers/TRL, Axolotl and LLaMA-Factory are flat mappings
at column 0; a key's block is its line and the indented lines under it. JSON: the value spans
of the top-level object are found with the standard library's own scanner.
"""

from __future__ import annotations

import json
import re
from typing import Any

from lrsweep.errors import ConfigError


_YAML_KEY = re.compile(r"^([A-Za-z_][\w.-]*)[ \t]*:(?=\s|$)")
_COMMENT = re.compile(r"[ \t]+#.*$")
_PLAIN = re.compile(r"^[A-Za-z_][\w./-]*$")
_RESERVED = {"true", "false", "yes", "no", "on", "off", "null", "none", "~"}


def yaml_scalar(value: Any) -> str:
    """A value as YAML flow text that PyYAML (YAML 1.1) reads back as the same value."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        text = repr(value)
        # YAML 1.1 reads 1e-05 as a string: its floats need a dot.
        if "e" in text and "." not in text:
            mantissa, exponent = text.split("e")
            text = f"{mantissa}.0e{exponent}"
        return text
    if isinstance(value, str):
        return (
            value if _PLAIN.match(value) and value.lower() not in _RESERVED else json.dumps(value)
        )
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {yaml_scalar(v)}" for k, v in value.items()) + "}"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(yaml_scalar(v) for v in value) + "]"
    raise TypeError(f"no YAML form for {type(value).__name__}")


def _yaml_blocks(lines: list[str]) -> dict[str, tuple[int, int]]:
    """Each top-level key's [first, end) line span: its line and the indented lines below."""
    blocks: dict[str, tuple[int, int]] = {}
    i = 0
    while i < len(lines):
        match = _YAML_KEY.match(lines[i])
        if not match:
            i += 1
            continue
        end = i + 1
        while end < len(lines) and (lines[end][:1] in (" ", "\t") or lines[end].startswith("- ")):
            end += 1
        blocks[match.group(1)] = (i, end)
        i = end
    return blocks


def edit_yaml(
    text: str, values: dict[str, Any], remove: tuple[str, ...] = (), note: str = ""
) -> str:
    """``text`` with each key of ``values`` set (in place where it is, else appended after
    ``note``, a comment) and the keys of ``remove`` deleted."""
    lines = text.splitlines(keepends=True)
    blocks = _yaml_blocks(lines)
    replace: dict[int, tuple[int, str]] = {}
    for key in remove:
        if key in blocks and key not in values:
            first, end = blocks[key]
            replace[first] = (end, "")
    for key, value in values.items():
        if key in blocks:
            first, end = blocks[key]
            line = lines[first].rstrip("\r\n")
            newline = lines[first][len(line) :] or "\n"
            rest = line[_YAML_KEY.match(line).end() :]  # type: ignore[union-attr]
            comment = _COMMENT.search(rest) if end == first + 1 else None
            tail = comment.group(0) if comment else ""
            replace[first] = (end, f"{key}: {yaml_scalar(value)}{tail}{newline}")
    out, i = [], 0
    while i < len(lines):
        if i in replace:
            end, new = replace[i]
            out.append(new)
            i = end
        else:
            out.append(lines[i])
            i += 1
    added = [f"{k}: {yaml_scalar(v)}\n" for k, v in values.items() if k not in blocks]
    if added:
        if out and not out[-1].endswith("\n"):
            out[-1] += "\n"
        out += ([f"# {note}\n"] if note else []) + added
    return "".join(out)


def _json_entries(text: str) -> tuple[list[tuple[str, int, int, int]], int]:
    """The top-level object's entries as (key, entry start, value start, value end), and the
    offset of its closing brace."""
    decoder = json.JSONDecoder()
    ws = re.compile(r"\s*")
    i = ws.match(text, 0).end()  # type: ignore[union-attr]
    if text[i : i + 1] != "{":
        raise ConfigError("the JSON config must be an object of TrainingArguments keys")
    i = ws.match(text, i + 1).end()  # type: ignore[union-attr]
    entries = []
    while text[i : i + 1] != "}":
        start = i
        key, i = json.decoder.scanstring(text, i + 1)  # type: ignore[attr-defined]
        i = ws.match(text, i).end() + 1  # type: ignore[union-attr]  # past ':'
        i = ws.match(text, i).end()  # type: ignore[union-attr]
        _, end = decoder.raw_decode(text, i)
        entries.append((key, start, i, end))
        i = ws.match(text, end).end()  # type: ignore[union-attr]
        if text[i : i + 1] == ",":
            i = ws.match(text, i + 1).end()  # type: ignore[union-attr]
    return entries, i


def edit_json(text: str, values: dict[str, Any], remove: tuple[str, ...] = ()) -> str:
    """``text`` with each key of ``values`` set (in place, else added last) and the keys of
    ``remove`` deleted; the rest of the text is kept as it was."""
    try:
        json.loads(text)
        entries, close = _json_entries(text)
    except (json.JSONDecodeError, ValueError) as err:
        raise ConfigError(f"not valid JSON ({err})") from None
    found = {key for key, *_ in entries}
    edits: list[tuple[int, int, str]] = []
    for key, _, vstart, vend in entries:
        if key in values:
            edits.append((vstart, vend, json.dumps(values[key])))
    gone = [n for n, (key, *_) in enumerate(entries) if key in remove and key not in values]
    for first, last in _runs(gone):
        # A run of adjacent entries goes as one span: with the separator after it, or for a
        # run at the end the one before it; a run that is every entry leaves the braces.
        if last + 1 < len(entries):
            edits.append((entries[first][1], entries[last + 1][1], ""))
        elif first > 0:
            edits.append((entries[first - 1][3], entries[last][3], ""))
        else:
            edits.append((entries[first][1], entries[last][3], ""))
    added = [(k, v) for k, v in values.items() if k not in found]
    if added:
        indent_match = re.search(r"\n([ \t]*)\S", text[: entries[0][1] + 1]) if entries else None
        indent = indent_match.group(1) if indent_match else ""
        sep = f",\n{indent}" if indent_match else ", "
        body = sep.join(f"{json.dumps(k)}: {json.dumps(v)}" for k, v in added)
        kept = [n for n in range(len(entries)) if n not in gone]
        if kept:
            last_end = entries[kept[-1]][3]
            edits.append((last_end, last_end, sep + body))
        elif entries:  # every entry removed: the new ones take their place
            edits.append((entries[0][1], entries[0][1], body))
        else:
            edits.append((close, close, body + ("\n" if indent_match else "")))
    # At one offset the removal (the longer span) goes first, then the insertion before it.
    for start, end, new in sorted(edits, reverse=True):
        text = text[:start] + new + text[end:]
    try:
        json.loads(text)
    except json.JSONDecodeError as err:  # a bug of this function, caught before any write
        raise ConfigError(
            f"lrsweep's edit of the JSON config is not valid JSON ({err}); nothing was written, "
            "please report it with the config"
        ) from None
    return text


def _runs(indices: list[int]) -> list[tuple[int, int]]:
    """Sorted indices as (first, last) runs of consecutive ones: [1, 2, 4] -> [(1, 2), (4, 4)]."""
    runs: list[tuple[int, int]] = []
    for n in indices:
        if runs and runs[-1][1] == n - 1:
            runs[-1] = (runs[-1][0], n)
        else:
            runs.append((n, n))
    return runs
