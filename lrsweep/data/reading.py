"""Reading corpora and instruction data from files, and detecting their format as TRL does.

A file is one of three formats, read from its columns (the first record's keys for JSON):
``messages`` (or ShareGPT's ``conversations``) is chat, ``prompt`` + ``completion`` is
prompt-completion, anything else is text in ``data.text_field``. Every instruction row is
checked before anything is tokenised; the first malformed one stops the run with one line
naming the file, the row and the problem.
"""

from __future__ import annotations

import csv
import json
import sysconfig
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lrsweep.errors import DataError
from lrsweep.hub import is_hub_id


if TYPE_CHECKING:
    from lrsweep.config import DataConfig

# Folders of the standard library that are not the library itself.
STDLIB_SKIP = {"site-packages", "dist-packages", "test", "tests", "idle_test", "pydoc_data"}
TEXT_SUFFIXES = (".txt", ".md", ".py", "")
TABLE_SUFFIXES = (".parquet", ".csv")
JSON_SUFFIXES = (".jsonl", ".json")
_SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}


@dataclass
class Row:
    """One instruction example: ``messages`` (chat), or ``prompt`` + ``completion`` (each a
    string, or a list of messages for conversational prompt-completion)."""

    where: str  # "row 3" or "line 3", for error messages
    messages: list[dict[str, Any]] | None = None
    prompt: str | list[dict[str, Any]] | None = None
    completion: str | list[dict[str, Any]] | None = None
    tools: list[Any] | None = None
    template_kwargs: dict[str, Any] = field(default_factory=dict)

    @property
    def conversational(self) -> bool:
        return self.messages is not None or isinstance(self.prompt, list)

    def chars(self) -> int:
        """A rough size, used only to stop reading rows early."""
        parts = self.messages or [
            *(self.prompt if isinstance(self.prompt, list) else [{"content": self.prompt}]),
            *(self.completion if isinstance(self.completion, list) else [{"content": ""}]),
        ]
        size = sum(len(str(m.get("content") or "")) + 16 for m in parts)
        return size + (len(self.completion) if isinstance(self.completion, str) else 0)


@dataclass
class Data:
    """What a data path holds: ``documents`` (text) or ``rows`` (chat / prompt_completion)."""

    format: str
    source: str
    documents: list[str] = field(default_factory=list)
    rows: list[Row] = field(default_factory=list)


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_files() -> list[Path]:
    """The standard library's own .py modules, without site-packages and test suites."""
    root = stdlib_root()
    files = []
    for path in root.rglob("*.py"):
        if not STDLIB_SKIP.intersection(path.relative_to(root).parts[:-1]):
            files.append(path)
    return sorted(files)


def _read_table(path: Path) -> tuple[list[str], list[dict[str, Any]]]:
    import pyarrow as pa
    import pyarrow.csv
    import pyarrow.parquet as pq

    try:
        if path.is_dir():
            tables = []
            for arrow in _arrow_files(path):
                with pa.memory_map(str(arrow)) as source:
                    try:
                        tables.append(pa.ipc.open_stream(source).read_all())
                    except pa.ArrowInvalid:
                        tables.append(pa.ipc.open_file(source).read_all())
            table = pa.concat_tables(tables)
        elif path.suffix.lower() == ".parquet":
            table = pq.read_table(path)
        elif path.suffix.lower() == ".csv":
            # Every cell as text: pyarrow would make "4" an int, which no row may hold.
            with path.open(encoding="utf-8-sig", errors="replace", newline="") as file:
                header = next(csv.reader(file), [])
            strings = pyarrow.csv.ConvertOptions(column_types=dict.fromkeys(header, pa.string()))
            table = pyarrow.csv.read_csv(path, convert_options=strings)
        else:
            raise AssertionError(path.suffix)
    except (pa.ArrowInvalid, OSError) as err:
        raise DataError(f"{path}: cannot read ({err})") from None
    return table.column_names, table.to_pylist()


def _arrow_files(folder: Path) -> list[Path]:
    """The data files of a ``save_to_disk`` folder: a DatasetDict's train split, a Dataset's
    own files (as its state.json lists them: map() caches may lie beside them)."""
    if (folder / "dataset_dict.json").is_file():
        splits = json.loads(_read_text(folder / "dataset_dict.json")).get("splits", [])
        if "train" not in splits:
            raise DataError(
                f"{folder}: a DatasetDict with splits {splits} and no 'train'; give "
                f"data.path={folder}/<split>"
            )
        folder = folder / "train"
    state = folder / "state.json"
    if state.is_file():
        names = [f["filename"] for f in json.loads(_read_text(state)).get("_data_files", [])]
        arrows = [folder / name for name in names]
    else:
        arrows = sorted(folder.glob("*.arrow"))
    if not arrows:
        raise DataError(
            f"{folder}: a folder must be saved with datasets' save_to_disk (no .arrow files)"
        )
    return arrows


def _read_text(path: Path) -> str:
    """A UTF-8 file (with or without a byte-order mark), or one line saying it is not."""
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as err:
        raise DataError(
            f"{path}: not UTF-8 text ({err.reason} at byte {err.start}); convert it, e.g. "
            "iconv -f <its encoding> -t UTF-8"
        ) from None


def _read_json(path: Path) -> tuple[list[str], list[tuple[str, Any]]]:
    """(the first record's keys, [(where, record)]) of a .jsonl or .json file."""
    text = _read_text(path)
    if path.suffix.lower() == ".jsonl" or not text.lstrip().startswith("["):
        records = []
        for number, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                records.append((f"line {number}", json.loads(line)))
            except json.JSONDecodeError as err:
                raise DataError(f"{path}: line {number}: not valid JSON ({err})") from None
    else:
        try:
            loaded = json.loads(text)
        except json.JSONDecodeError as err:
            raise DataError(f"{path}: not valid JSON ({err})") from None
        if not isinstance(loaded, list):
            raise DataError(f"{path}: a .json file must hold a list of records")
        records = [(f"row {i}", r) for i, r in enumerate(loaded, 1)]
    first = next((r for _, r in records if isinstance(r, dict)), {})
    return list(first), records


def detect_format(columns: list[str], text_field: str) -> str | None:
    """TRL's rule: ``messages`` is chat, ``prompt`` + ``completion`` is prompt-completion."""
    if "messages" in columns or "conversations" in columns:
        return "chat"
    if "prompt" in columns and "completion" in columns:
        return "prompt_completion"
    if "instruction" in columns and "output" in columns:  # Alpaca's rows
        return "prompt_completion"
    if text_field in columns:
        return "text"
    return None


def read_data(config: DataConfig) -> Data:
    """Read ``config.path`` (not ``stdlib-instruct``, which :mod:`.stdlib_instruct` builds)."""
    if config.path == "stdlib":
        files = stdlib_files()
        docs = [p.read_text(encoding="utf-8", errors="replace") for p in files]
        return Data("text", "stdlib", documents=docs)
    path = Path(config.path).expanduser()
    # A missing runs/train.jsonl is a mistyped file, not a Hub dataset: a data file's suffix.
    suffix = path.suffix.lower()
    local = bool(suffix) and suffix in (*TEXT_SUFFIXES, *TABLE_SUFFIXES, *JSON_SUFFIXES)
    if not path.exists() and not local and is_hub_id(config.path):
        columns, plain = _read_hub(config.path)
        return _from_records(
            config, path, columns, [(f"row {i}", r) for i, r in enumerate(plain, 1)], "columns are"
        )
    if not path.exists():
        raise DataError(
            f"data.path: {path} does not exist; give a .txt, .jsonl, .json, "
            ".parquet, .csv file or a save_to_disk folder, or 'stdlib' / 'stdlib-instruct'"
        )
    if not path.is_dir() and suffix in TEXT_SUFFIXES:
        if config.format not in ("auto", "text"):
            raise DataError(
                f"data.format = {config.format} but {path.name} is plain text; give a .jsonl, "
                ".json, .parquet, .csv file or a save_to_disk folder"
            )
        return Data("text", path.name, documents=_nonempty([_read_text(path)], path))
    if path.is_dir() or suffix in TABLE_SUFFIXES:
        columns, plain = _read_table(path)
        records = [(f"row {i}", r) for i, r in enumerate(plain, 1)]
        where = "columns are"
    elif suffix in JSON_SUFFIXES:
        columns, records = _read_json(path)
        where = "keys of the first record are"
    else:
        raise DataError(
            f"data.path: unsupported file type {suffix!r}; use .txt, .jsonl, "
            ".json, .parquet, .csv or a save_to_disk folder"
        )
    return _from_records(config, path, columns, records, where)


def _from_records(
    config: DataConfig,
    path: Path,
    columns: list[str],
    records: list[tuple[str, Any]],
    where: str,
) -> Data:
    """Text documents or instruction rows out of a file's (or dataset's) records."""
    if not records:
        raise DataError(f"data.path: {path} holds no rows")
    suffix = path.suffix.lower()
    fmt = config.format if config.format != "auto" else detect_format(columns, config.text_field)
    if fmt is None or (fmt == "text" and config.text_field not in columns):
        noun = "no record has the text field" if suffix in JSON_SUFFIXES else "no text field"
        raise DataError(
            f"{path}: {noun} {config.text_field!r} and no messages or prompt/completion "
            f"columns; {where} {sorted(columns)}; set data.text_field or data.format"
        )
    if fmt == "text":
        docs = []
        for at, record in records:
            value = record.get(config.text_field) if isinstance(record, dict) else record
            if not isinstance(value, str):
                raise DataError(
                    f"{path.name}: {at}: {config.text_field!r} is not text (got "
                    f"{type(value).__name__}); give every record one, or set data.text_field"
                )
            docs.append(value)
        return Data("text", path.name, documents=_nonempty(docs, path))
    cells = suffix == ".csv"  # CSV cells hold message lists as JSON text
    rows = [parse_row(record, where, fmt, path.name, cells) for where, record in records]
    kinds = {row.conversational for row in rows}
    if fmt == "prompt_completion" and len(kinds) > 1:
        odd = next(r for r in rows if r.conversational != rows[0].conversational)
        raise DataError(
            f"{path.name}: {odd.where}: prompt/completion are "
            f"{'message lists' if odd.conversational else 'strings'} but the first row's are not"
        )
    return Data(fmt, path.name, rows=rows)


def _read_hub(name: str) -> tuple[list[str], list[dict[str, Any]]]:
    """The train split of a Hub dataset, through datasets (its cache, or a download online)."""
    try:
        import datasets
    except ImportError:
        raise DataError(
            f"data.path: {name} is a Hub dataset ID; reading it needs pip install datasets"
        ) from None
    try:
        dataset = datasets.load_dataset(name, split="train")
    except Exception as err:  # offline, missing, gated: datasets raises many types
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise DataError(
            f"data.path: cannot load the Hub dataset {name} ({first}); give a local file or "
            "folder, or run where the Hub (or its cache) is reachable"
        ) from None
    return list(dataset.column_names), dataset.to_list()


def _nonempty(docs: list[str], path: Path) -> list[str]:
    docs = [d for d in docs if d.strip()]
    if not docs:
        raise DataError(f"data.path: {path} holds no text")
    return docs


def parse_row(record: Any, where: str, fmt: str, source: str, json_cells: bool = False) -> Row:
    """Check one record of a chat or prompt-completion file and normalise it into a Row;
    ``json_cells``: prompt and completion strings holding JSON lists are message lists."""

    def fail(problem: str) -> DataError:
        return DataError(f"{source}: {where}: {problem}")

    if not isinstance(record, dict):
        raise fail(f"is a {type(record).__name__}, not a record")
    tools = record.get("tools")
    if isinstance(tools, str):
        try:
            tools = json.loads(tools)
        except json.JSONDecodeError:
            raise fail("tools is a string but not JSON") from None
    if tools is not None and not isinstance(tools, list):
        raise fail("tools must be a list of tool schemas")
    kwargs = record.get("chat_template_kwargs") or {}
    if not isinstance(kwargs, dict):
        raise fail("chat_template_kwargs must be a mapping")
    row = Row(where, tools=tools or None, template_kwargs=kwargs)
    if fmt == "chat":
        if "messages" in record:
            row.messages = _messages(record["messages"], "messages", fail)
        elif "conversations" in record:
            row.messages = _sharegpt(record["conversations"], fail)
        else:
            raise fail(f"has no messages (keys: {sorted(record)})")
        if row.messages[0]["role"] == "assistant":
            raise fail("the first message is the assistant's; start with a system or user one")
        return row
    if "prompt" not in record and "instruction" in record and "output" in record:
        # Alpaca: the input (when there is one) follows the instruction on a new line, as
        # LLaMA-Factory joins them.
        extra = record.get("input") or ""
        record = {
            "prompt": f"{record['instruction']}\n{extra}" if extra else record["instruction"],
            "completion": record["output"],
        }
    if "prompt" not in record or "completion" not in record:
        raise fail(f"needs prompt and completion (keys: {sorted(record)})")
    prompt, completion = record["prompt"], record["completion"]
    if json_cells:
        prompt, completion = _json_list(prompt), _json_list(completion)
    if isinstance(prompt, str) and isinstance(completion, str):
        if not completion:
            raise fail("completion is empty")
        row.prompt, row.completion = prompt, completion
    elif isinstance(prompt, (list, str)) and isinstance(completion, (list, str)):
        if isinstance(prompt, str) or isinstance(completion, str):
            raise fail("prompt and completion must both be strings or both message lists")
        row.prompt = _messages(prompt, "prompt", fail)
        row.completion = _messages(completion, "completion", fail)
    else:
        raise fail(
            f"prompt and completion must be strings or message lists, got "
            f"{type(prompt).__name__} and {type(completion).__name__}"
        )
    return row


def _json_list(value: Any) -> Any:
    """A CSV cell holding a JSON list of messages as that list; any other cell as it is."""
    if isinstance(value, str) and value.lstrip().startswith("["):
        try:
            loaded = json.loads(value)
        except json.JSONDecodeError:
            return value
        if isinstance(loaded, list) and loaded and all(isinstance(m, dict) for m in loaded):
            return loaded
    return value


def _messages(value: Any, key: str, fail: Any) -> list[dict[str, Any]]:
    if isinstance(value, str):  # CSV cells hold message lists as JSON
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            raise fail(f"{key} is a string, not a list of {{role, content}} messages") from None
    if not isinstance(value, list) or not value:
        raise fail(f"{key} must be a non-empty list of {{role, content}} messages")
    out = []
    for j, message in enumerate(value):
        if not isinstance(message, dict):
            raise fail(f"{key}[{j}] is not a {{role, content}} object")
        # Arrow gives every message the union of all keys, missing ones as None.
        message = {k: v for k, v in message.items() if v is not None}
        role = message.get("role")
        if not isinstance(role, str) or not role:
            raise fail(f"{key}[{j}] has no role")
        content = message.get("content")
        if content is None and not message.get("tool_calls"):
            raise fail(f"{key}[{j}] ({role}) has no content")
        if content is not None and not isinstance(content, (str, list)):
            raise fail(f"{key}[{j}] content must be a string, got {type(content).__name__}")
        out.append(message)
    return out


def _sharegpt(value: Any, fail: Any) -> list[dict[str, Any]]:
    """ShareGPT's ``{from, value}`` turns as ``{role, content}`` messages (TRL converts them)."""
    if not isinstance(value, list) or not value:
        raise fail("conversations must be a non-empty list of {from, value} turns")
    out = []
    for j, turn in enumerate(value):
        if not isinstance(turn, dict) or "from" not in turn or "value" not in turn:
            raise fail(f"conversations[{j}] is not a {{from, value}} turn")
        role = _SHAREGPT_ROLES.get(turn["from"], turn["from"])
        out.append({"role": role, "content": turn["value"]})
    return _messages(out, "conversations", fail)
