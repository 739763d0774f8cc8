"""``stdlib-instruct``: an offline instruction task built from the Python standard library.

Every public function and method with a docstring becomes one "write this function" example:
the prompt holds its signature and docstring as they stand in the source, the answer is its
body. Found with :mod:`ast` in the library's own modules (no site-packages, no test suites),
in sorted file order, duplicates dropped: the same interpreter always gives the same rows.
Bodies that are trivial (``pass``, ``...``, a bare ``raise NotImplementedError``) or long are
left out, so that most examples fit in a few hundred tokens.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import json
import logging
import sys
from pathlib import Path

from lrsweep.data.reading import Row, stdlib_files, stdlib_root


logger = logging.getLogger(__name__)

MAX_LINES = 40  # body lines
MAX_CHARS = 1000  # body and prompt characters, each
_VERSION = 1  # bump when the rows change, so that caches are rebuilt


def _trivial(body: list[ast.stmt]) -> bool:
    if len(body) != 1:
        return False
    stmt = body[0]
    if isinstance(stmt, ast.Pass):
        return True
    if isinstance(stmt, ast.Expr) and isinstance(stmt.value, ast.Constant):
        return True  # ... or a second string
    if isinstance(stmt, ast.Raise):
        exc = stmt.exc
        name = exc.func if isinstance(exc, ast.Call) else exc
        return isinstance(name, ast.Name) and name.id == "NotImplementedError"
    return False


def _functions(tree: ast.Module) -> list[tuple[ast.FunctionDef | ast.AsyncFunctionDef, str]]:
    """Module-level functions and the methods of module-level classes, with the class name."""
    found: list[tuple[ast.FunctionDef | ast.AsyncFunctionDef, str]] = []
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            found.append((node, ""))
        elif isinstance(node, ast.ClassDef) and not node.name.startswith("_"):
            for item in node.body:
                if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    found.append((item, node.name))
    return found


def _dedent(lines: list[str], width: int) -> list[str]:
    return [line[width:] if line[:width].strip() == "" else line.lstrip() for line in lines]


def module_rows(path: Path, module: str) -> list[dict[str, str]]:
    """The examples of one module: {module, cls, code (signature + docstring), body}."""
    try:
        source = path.read_text(encoding="utf-8")
        tree = ast.parse(source)
    except (SyntaxError, UnicodeDecodeError, ValueError):
        return []
    lines = source.splitlines()
    rows = []
    for node, cls in _functions(tree):
        if node.name.startswith("_") or ast.get_docstring(node) is None:
            continue
        doc, body = node.body[0], node.body[1:]
        if not body or _trivial(body) or doc.lineno == node.lineno:
            continue
        first = min([node.lineno, *(d.lineno for d in node.decorator_list)]) - 1
        indent = node.col_offset
        head = _dedent(lines[first : doc.end_lineno], indent)
        rest = _dedent(lines[doc.end_lineno : node.end_lineno], indent)
        while rest and not rest[-1].strip():
            rest.pop()
        code, answer = "\n".join(head), "\n".join(rest)
        if len(rest) > MAX_LINES or len(answer) > MAX_CHARS or len(code) > MAX_CHARS:
            continue
        rows.append({"module": module, "cls": cls, "code": code, "body": answer})
    return rows


def _module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _cache_file() -> Path:
    from lrsweep.models import cache_root

    key = hashlib.sha256(f"{_VERSION}:{sys.version}:{stdlib_root()}".encode()).hexdigest()[:16]
    return cache_root() / f"stdlib-instruct-{key}.jsonl"


@functools.lru_cache(maxsize=1)
def functions() -> tuple[dict[str, str], ...]:
    """Every example of the standard library (parsing it takes seconds: cached on disk)."""
    cache = _cache_file()
    if cache.is_file():
        try:
            return tuple(json.loads(line) for line in cache.read_text().splitlines())
        except (OSError, json.JSONDecodeError):
            logger.warning("stdlib-instruct cache %s is unreadable; building it again", cache)
    root = stdlib_root()
    seen: set[str] = set()
    rows = []
    for path in stdlib_files():
        for row in module_rows(path, _module_name(path, root)):
            if row["code"] not in seen:
                seen.add(row["code"])
                rows.append(row)
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_suffix(f".tmp{id(rows)}")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
        tmp.replace(cache)
    except OSError as err:
        logger.warning("could not write the stdlib-instruct cache %s (%s)", cache, err)
    return tuple(rows)


def instruction(row: dict[str, str]) -> str:
    where = f"a method of class `{row['cls']}` in" if row["cls"] else "a function in"
    return (
        f"Write the body of this Python function, {where} the standard library module "
        f"`{row['module']}`. Answer with the indented body only, in a code block.\n\n"
        f"```python\n{row['code']}\n```"
    )


def answer(row: dict[str, str]) -> str:
    return f"```python\n{row['body']}\n```"


def rows(fmt: str) -> list[Row]:
    """The task as chat rows (``messages``: the instruction, then the body) or as plain
    prompt-completion rows (the signature and docstring as code, then the body)."""
    out = []
    for i, row in enumerate(functions(), 1):
        where = f"function {i} ({row['module']})"
        if fmt == "chat":
            messages = [
                {"role": "user", "content": instruction(row)},
                {"role": "assistant", "content": answer(row)},
            ]
            out.append(Row(where, messages=messages))
        else:
            # The prompt ends on the docstring's quotes, not on a newline that the
            # tokenizer would merge with the body's indentation.
            prompt = f"# {row['module']}\n{row['code']}"
            out.append(Row(where, prompt=prompt, completion="\n" + row["body"] + "\n"))
    return out
