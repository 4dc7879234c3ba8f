"""Reading dataset files into rows, and the row-level cleanup every task shares.

Every row keeps where it came from (``line 7`` of a JSONL/txt file, ``row 7`` of a CSV/JSON/Parquet table,
1-based, header not counted) so that any error about bad data can name the file, the place and the field.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import io
import json
import re
import string
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, cast

from finetune_api.spec import DatasetSpec, Task

SUPPORTED = {
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".json": "json",
    ".csv": "csv",
    ".tsv": "csv",
    ".parquet": "parquet",
    ".pq": "parquet",
    ".txt": "txt",
}


class DataError(ValueError):
    """The data (or how the spec maps it) cannot be used. The message names the file, the line or row and the
    field, and says what to change. Re-exported by ``finetune_trainer.data``."""


@dataclass
class Table:
    """Rows read from one file, with each row's source position for error messages."""

    name: str  # what messages call the file: its URI when known, else its path
    fmt: str
    rows: list[dict[str, Any]]
    positions: list[int]  # 1-based line (jsonl, txt) or row (csv, json, parquet) of each row
    sha256: str = ""
    columns: list[str] = field(default_factory=list)  # every column seen, in first-seen order

    @property
    def unit(self) -> str:
        return "line" if self.fmt in ("jsonl", "txt") else "row"

    def where(self, index: int, column: str | None = None) -> str:
        """``train.jsonl line 7, field 'question'``: the place in the file of ``rows[index]``."""
        out = f"{self.name} {self.unit} {self.positions[index]}"
        return out + (f", field {column!r}" if column else "")

    def select(self, indices: Iterable[int]) -> Table:
        idx = list(indices)
        return Table(
            self.name,
            self.fmt,
            [self.rows[i] for i in idx],
            [self.positions[i] for i in idx],
            self.sha256,
            self.columns,
        )


def detect_format(path: Path, file_format: str = "auto", name: str | None = None) -> str:
    """The file format: ``file_format`` unless it is "auto", else from the extension (``.gz`` is allowed)."""
    if file_format and file_format != "auto":
        if file_format not in set(SUPPORTED.values()):
            raise DataError(f"{name or path}: unsupported dataset.fileFormat {file_format!r}")
        return file_format
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] == ".gz":
        suffixes = suffixes[:-1]
    fmt = SUPPORTED.get(suffixes[-1] if suffixes else "")
    if fmt is None or (fmt == "parquet" and path.suffix.lower() == ".gz"):
        raise DataError(
            f"{name or path}: unsupported file extension {''.join(path.suffixes) or '(none)'!r}; use one of "
            f"{', '.join(sorted(SUPPORTED))} (optionally .gz, not for parquet), or set dataset.fileFormat"
        )
    return fmt


def _open(path: Path) -> IO[bytes]:
    return cast(IO[bytes], gzip.open(path, "rb")) if path.suffix.lower() == ".gz" else path.open("rb")


def _decoded_lines(path: Path, name: str) -> Iterable[tuple[int, str]]:
    """(line number, text) per line, decoding each line on its own so a bad byte names its line."""
    with _open(path) as fh:
        for number, raw in enumerate(fh, start=1):
            try:
                text = raw.decode("utf-8-sig" if number == 1 else "utf-8")
            except UnicodeDecodeError as exc:
                raise DataError(f"{name} line {number}: not valid UTF-8 ({exc.reason} at byte {exc.start})") from None
            yield number, text.rstrip("\r\n")


def _blank(path: Path) -> bool:
    """Whether the file (decompressed) holds nothing but whitespace and a byte-order mark."""
    try:
        with _open(path) as fh:
            while chunk := fh.read(1 << 16):
                if chunk.replace(b"\xef\xbb\xbf", b"").strip():
                    return False
    except (OSError, EOFError):
        return False  # not gzip after all, or truncated: the reader below says what is wrong
    return True


def _records(items: Any, name: str) -> list[dict[str, Any]]:
    for i, item in enumerate(items, start=1):
        if not isinstance(item, dict):
            raise DataError(f"{name} row {i}: expected a JSON object (a record), got {type(item).__name__}")
    return list(items)


def _native(value: Any) -> Any:
    """numpy / pandas scalars -> Python values; NaN (pandas' empty cell) -> None."""
    if hasattr(value, "item") and not isinstance(value, list | dict | str | bytes):
        value = value.item()
    if isinstance(value, float) and value != value:
        return None
    return value


def read_table(path: Path, file_format: str = "auto", name: str | None = None) -> Table:
    """Read ``path`` (jsonl, json, csv/tsv, parquet or txt) into a Table. Malformed input raises DataError."""
    name = name or str(path)
    if not path.is_file():
        raise DataError(f"{name}: file not found ({path})")
    fmt = detect_format(path, file_format, name)
    if _blank(path):
        detail = "0 bytes" if path.stat().st_size == 0 else "only whitespace"
        raise DataError(f"{name}: the file is empty ({detail}); it holds no samples")
    rows: list[dict[str, Any]] = []
    positions: list[int] = []
    if fmt in ("jsonl", "txt"):
        for number, line in _decoded_lines(path, name):
            if not line.strip():
                continue  # blank lines separate nothing and are never samples
            if fmt == "txt":
                rows.append({"text": line})
            else:
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise DataError(f"{name} line {number}: malformed JSON: {exc.msg} (column {exc.colno})") from None
                if not isinstance(obj, dict):
                    raise DataError(f"{name} line {number}: expected a JSON object, got {type(obj).__name__}")
                rows.append(obj)
            positions.append(number)
    elif fmt == "json":
        try:
            with _open(path) as fh:
                doc = json.load(io.TextIOWrapper(fh, encoding="utf-8-sig"))
        except json.JSONDecodeError as exc:
            raise DataError(f"{name} line {exc.lineno}: malformed JSON: {exc.msg} (column {exc.colno})") from None
        except UnicodeDecodeError as exc:
            raise DataError(f"{name}: not valid UTF-8 ({exc.reason} at byte {exc.start})") from None
        if isinstance(doc, dict) and isinstance(doc.get("data"), list):
            doc = doc["data"]
        if not isinstance(doc, list):
            raise DataError(f'{name}: expected a JSON list of records or {{"data": [...]}}')
        rows = _records(doc, name)
        positions = list(range(1, len(rows) + 1))
    elif fmt == "csv":
        rows = _read_csv(path, name)
        positions = list(range(1, len(rows) + 1))
    else:
        rows = _read_parquet(path, name)
        positions = list(range(1, len(rows) + 1))
    if not rows:
        what = {"jsonl": "only blank lines", "txt": "only blank lines", "json": "an empty list of records"}
        detail = what.get(fmt, "a header but no rows" if fmt == "csv" else "no rows")
        raise DataError(f"{name}: the file is empty: {detail}; it holds no samples")
    columns = list(dict.fromkeys(k for row in rows for k in row))
    return Table(name, fmt, rows, positions, file_sha256(path), columns)


def _read_csv(path: Path, name: str) -> list[dict[str, Any]]:
    import pandas as pd

    sep = "\t" if ".tsv" in [s.lower() for s in path.suffixes] else ","
    try:
        # keep_default_na=False: an empty cell is "", and "NA"/"null" stay text (they are words in text data).
        frame = pd.read_csv(path, sep=sep, keep_default_na=False, encoding="utf-8-sig", compression="infer")
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise DataError(f"{name}: cannot parse as CSV: {exc}") from None
    return [{str(k): _native(v) for k, v in rec.items()} for rec in frame.to_dict("records")]


def _read_parquet(path: Path, name: str) -> list[dict[str, Any]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        return list(pq.read_table(path).to_pylist())
    except (pa.ArrowInvalid, OSError) as exc:
        raise DataError(f"{name}: cannot read as Parquet: {exc}") from None


def load_rows(path: Path, file_format: str = "auto") -> list[dict[str, Any]]:
    """Rows of a jsonl, json (a list of records or ``{"data": [...]}``), csv, parquet or txt file (one sample
    per line -> ``{"text": line}``, blank lines skipped)."""
    return read_table(Path(path), file_format).rows


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


# ---- row cleanup -----------------------------------------------------------------------------------------

_SPACE = re.compile(r"[^\S\n]+")  # whitespace other than newlines
_BLANK_LINES = re.compile(r"\n\s*\n\s*")


def clean_text(value: str) -> str:
    """Strip the ends, collapse runs of spaces/tabs to one space and blank-line runs to one blank line.

    Newlines are kept: they carry structure in code, poetry and multi-paragraph posts.
    """
    if value.isprintable() and "  " not in value and value[:1] != " " and value[-1:] != " ":
        # Already clean (the common case, without the regexes): every whitespace character but the ASCII space
        # is unprintable, and single inner spaces are what cleaning leaves.
        return value
    return _clean(value)


def _clean(value: str) -> str:
    lines = (_SPACE.sub(" ", line).strip() for line in value.replace("\r\n", "\n").split("\n"))
    return _BLANK_LINES.sub("\n\n", "\n".join(lines)).strip()


def _clean_value(value: Any) -> Any:
    if isinstance(value, str):
        return clean_text(value)
    if isinstance(value, list):  # chat messages: clean the contents, keep the structure
        return [
            {k: clean_text(v) if k == "content" and isinstance(v, str) else v for k, v in m.items()}
            if isinstance(m, dict)
            else m
            for m in value
        ]
    return value


def _columns_hint(columns: Sequence[str]) -> str:
    return ", ".join(repr(c) for c in columns) or "(none)"


def rename_and_drop(table: Table, rename: dict[str, str], drop: Sequence[str], clean: bool) -> Table:
    """``dataset.rename`` then ``dataset.dropColumns`` then (optionally) whitespace cleanup of text values.

    A rename or drop of a column the file does not have is an error: it is almost always a typo, and
    silently training on the wrong column is worse than failing.
    """
    for old in rename:
        if old not in table.columns:
            raise DataError(
                f"{table.name}: dataset.rename names column {old!r}, which the file does not have; "
                f"columns: {_columns_hint(table.columns)}"
            )
    renamed = [rename.get(c, c) for c in table.columns]
    for col in drop:
        if col not in renamed:
            raise DataError(
                f"{table.name}: dataset.dropColumns names column {col!r}, which the file does not have "
                f"(after rename); columns: {_columns_hint(renamed)}"
            )
    dropped = set(drop)
    rows = []
    for row in table.rows:
        new = {rename.get(k, k): v for k, v in row.items()}
        rows.append({k: (_clean_value(v) if clean else v) for k, v in new.items() if k not in dropped})
    columns = [c for c in renamed if c not in dropped]
    return Table(table.name, table.fmt, rows, table.positions, table.sha256, columns)


def require_column(table: Table, column: str, purpose: str) -> None:
    """Fail early, naming the file, when no row has ``column`` at all."""
    if column not in table.columns:
        raise DataError(
            f"{table.name}: column {column!r} ({purpose}) not found; columns: {_columns_hint(table.columns)}. "
            "Map it with dataset.fields or dataset.rename"
        )


@functools.cache
def parse_template(template: str) -> tuple[tuple[str, str | None], ...]:
    """``(literal text, column name or None)`` pieces of a ``{column}`` template.

    A placeholder must be a plain column name. Attribute and index access (``{q.__class__}``, ``{q[0]}``),
    positional fields (``{0}``, ``{}``), conversions and format specs raise ValueError: the trainer never hands
    row data to ``str.format``, so even a template that bypassed validation can only insert a row's values.
    """
    pieces: list[tuple[str, str | None]] = []
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as exc:
        raise ValueError(f"{exc}; write literal braces as {{{{ }}}}") from None
    for literal, name, spec, conv in parsed:
        if name is not None:
            shown = "{" + name + (f"!{conv}" if conv else "") + (f":{spec}" if spec else "") + "}"
            if not name.isidentifier() or spec or conv:
                raise ValueError(f"placeholder {shown} is not a plain column name; write {{column}}")
        pieces.append((literal, name))
    return tuple(pieces)


def template_fields(template: str) -> tuple[str, ...]:
    """The column names of the ``{placeholders}`` in a template, in first-use order (ValueError if malformed)."""
    return tuple(dict.fromkeys(name for _, name in parse_template(template) if name is not None))


def fill_template(template: str, row: dict[str, Any]) -> str:
    """The template with each ``{column}`` replaced by ``str(row[column])``; KeyError names a missing column."""
    return "".join(literal + ("" if name is None else str(row[name])) for literal, name in parse_template(template))


def check_template(table: Table, template: str, which: str) -> None:
    """A placeholder that is no column is a spec error: name it and list what is available."""
    try:
        fields = template_fields(template)
    except ValueError as exc:
        raise DataError(f"dataset.template.{which}: invalid template: {exc}") from None
    for fname in fields:
        if fname not in table.columns:
            raise DataError(
                f"{table.name}: dataset.template.{which} uses field {{{fname}}}, which is not a column; "
                f"available columns: {_columns_hint(table.columns)}"
            )


def render(table: Table, index: int, template: str, which: str) -> str:
    """The row's sample text from ``template``, with an error that names the row and the missing field."""
    row = table.rows[index]
    try:
        return fill_template(template, row)
    except KeyError as exc:
        field_name = str(exc.args[0])
        raise DataError(
            f"{table.where(index, field_name)}: dataset.template.{which} needs this field but the row lacks it; "
            f"row has: {_columns_hint(list(row))}"
        ) from None
    except ValueError as exc:
        raise DataError(f"dataset.template.{which}: invalid template: {exc}") from None


def get_value(table: Table, index: int, column: str) -> Any:
    """``row[column]``; a row that lacks the column is an error naming the row and the row's columns."""
    row = table.rows[index]
    if column not in row:
        raise DataError(f"{table.where(index, column)}: missing; row has: {_columns_hint(list(row))}")
    return row[column]


def is_blank(value: Any) -> bool:
    return value is None or (isinstance(value, str) and not value.strip())


# ---- rows -> task samples -------------------------------------------------------------------------------------


def _text(table: Table, i: int, column: str) -> str | None:
    value = get_value(table, i, column)
    if is_blank(value):
        return None
    if isinstance(value, int | float) and not isinstance(value, bool):
        return str(value)
    if not isinstance(value, str):
        raise DataError(f"{table.where(i, column)}: expected text, got {type(value).__name__}")
    return value


def _messages(table: Table, i: int, column: str) -> list[dict[str, str]] | None:
    value = get_value(table, i, column)
    if value is None or value == []:
        return None
    where = table.where(i, column)
    if not isinstance(value, list):
        raise DataError(f"{where}: expected a list of {{role, content}} messages, got {type(value).__name__}")
    for n, m in enumerate(value, start=1):
        if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
            raise DataError(f"{where}: message {n} must be an object with string 'role' and 'content'")
    if not any(m["role"] == "assistant" for m in value):
        raise DataError(f"{where}: no message with role 'assistant', so there is nothing to learn from")
    return [{"role": m["role"], "content": m["content"]} for m in value]


def check_task_columns(table: Table, spec: DatasetSpec, task: Task) -> None:
    """Spec-level checks against the file's columns: the template's fields and the task's columns exist."""
    f, tpl = spec.fields, spec.template
    if task == Task.INSTRUCTION and (tpl is None or not tpl.response):
        raise DataError("dataset.template with a non-empty response is required for task instruction")
    if tpl is not None and task != Task.CHAT:
        check_template(table, tpl.prompt, "prompt")
        if task in (Task.CAUSAL_LM, Task.INSTRUCTION):
            check_template(table, tpl.response, "response")
    needed = {
        Task.CAUSAL_LM: [] if tpl else [(f.text, "dataset.fields.text")],
        Task.INSTRUCTION: [],
        Task.CHAT: [(f.messages, "dataset.fields.messages")],
        Task.SEQ2SEQ: ([] if tpl else [(f.input, "dataset.fields.input")]) + [(f.target, "dataset.fields.target")],
        Task.CLASSIFICATION: ([] if tpl else [(f.text, "dataset.fields.text")]) + [(f.label, "dataset.fields.label")],
    }[task]
    for column, purpose in needed:
        require_column(table, column, purpose)


def task_sample(table: Table, i: int, spec: DatasetSpec, task: Task) -> dict[str, Any] | None:
    """The task fields of row ``i``, or None when one of them is empty (the row is dropped)."""
    f, tpl = spec.fields, spec.template
    if tpl is not None and task != Task.CHAT:
        used = template_fields(tpl.prompt) + template_fields(tpl.response)
        if any(is_blank(table.rows[i].get(name)) for name in used if name in table.rows[i]):
            return None  # an empty question or answer would make an empty-looking sample: drop the row
    prompt = render(table, i, tpl.prompt, "prompt") if tpl and task != Task.CHAT else None
    sample: dict[str, Any]
    if task == Task.CHAT:
        sample = {"messages": _messages(table, i, f.messages)}
    elif task in (Task.INSTRUCTION, Task.CAUSAL_LM) and tpl is not None:
        sample = {"prompt": prompt, "response": render(table, i, tpl.response, "response")}
        if task == Task.CAUSAL_LM:
            sample["text"] = f"{sample['prompt']}{sample['response']}"
    elif task == Task.CAUSAL_LM:
        sample = {"text": _text(table, i, f.text)}
    elif task == Task.SEQ2SEQ:
        sample = {"prompt": prompt if tpl else _text(table, i, f.input), "response": _text(table, i, f.target)}
    else:
        sample = {"text": prompt if tpl else _text(table, i, f.text), "label": get_value(table, i, f.label)}
    return None if any(is_blank(v) for v in sample.values()) else sample
