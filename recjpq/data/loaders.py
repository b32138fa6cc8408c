"""Interaction files -> per-user item sequences with contiguous ids.

Two layouts are read: whitespace text where each line is ``user item [item ...]`` (one
interaction per line in time order, as in SASRec's ``ml-1m.txt``, or one whole sequence per
line), and CSV/TSV with a header naming user, item and timestamp columns (rating optional).
Items get ids ``1..N`` (0 is padding) in order of their raw ids, so already-contiguous
datasets keep their numbering.

Files are UTF-8 (a leading byte-order mark is skipped). Every malformed input, including
undecodable bytes, absurdly long numeric ids and non-finite timestamps or ratings, is a
``DataFormatError`` naming the file and line.
"""
from __future__ import annotations

import csv
import math
import os
from dataclasses import dataclass

import numpy as np

FORMATS = ("auto", "text", "csv", "tsv")
ENCODING = "utf-8-sig"  # UTF-8; a byte-order mark (as spreadsheet exports write) is not part of the header
#: longest all-digit id: such ids sort as numbers, and int() refuses over 4,300 digits anyway
MAX_ID_DIGITS = 100

_COLUMN_ALIASES = {
    "user": ("user", "user_id", "userid", "uid"),
    "item": ("item", "item_id", "itemid", "iid", "movie_id", "movieid"),
    "timestamp": ("timestamp", "time", "ts", "datetime"),
    "rating": ("rating", "score"),
}


class DataFormatError(ValueError):
    """A malformed input row; the message names the file, line and reason."""


@dataclass
class SequenceData:
    """Users' item sequences in time order. ``sequences[u]`` holds ids in ``1..num_items``;
    ``item_ids[i - 1]`` and ``user_ids[u]`` are the raw ids from the file."""

    sequences: list[np.ndarray]
    item_ids: list[str]
    user_ids: list[str]

    @property
    def num_items(self) -> int:
        return len(self.item_ids)

    @property
    def num_interactions(self) -> int:
        return int(sum(len(s) for s in self.sequences))


def _is_number(raw: str) -> bool:
    return (raw[1:] if raw[:1] == "-" else raw).isdecimal()


def _sort_key(raw: str):
    # numeric ids in numeric order ("03" before "3": the order never depends on set order),
    # anything else after them in string order
    return (0, int(raw), raw) if _is_number(raw) else (1, 0, raw)


def _id_problem(raw: str) -> str | None:
    if len(raw) > MAX_ID_DIGITS and _is_number(raw):
        return f"item id {raw[:12]}... has {len(raw)} digits; numeric ids may have at most {MAX_ID_DIGITS}"
    return None


def from_sequences(raw_sequences: dict[str, list[str]]) -> SequenceData:
    """Remap raw per-user sequences (ordered by user as given) to contiguous item ids."""
    unique = {i for seq in raw_sequences.values() for i in seq}
    if problem := next(filter(None, map(_id_problem, unique)), None):
        raise DataFormatError(problem)
    raw_items = sorted(unique, key=_sort_key)
    index = {raw: pos + 1 for pos, raw in enumerate(raw_items)}
    sequences = [np.fromiter((index[i] for i in seq), dtype=np.int64, count=len(seq))
                 for seq in raw_sequences.values()]
    return SequenceData(sequences, raw_items, list(raw_sequences))


def _undecodable(path: str) -> DataFormatError:
    """The first line of ``path`` that is not UTF-8, as an error naming it (the text decoder reads
    ahead in blocks, so its own error names neither file nor line)."""
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                raw.decode("utf-8")
            except UnicodeDecodeError as e:
                return DataFormatError(
                    f"{path}, line {lineno}: not UTF-8 text (byte 0x{raw[e.start]:02x} at column {e.start + 1}): "
                    "a binary file, or another encoding such as latin-1? Convert it, e.g. iconv -f latin1 -t utf-8")
    return DataFormatError(f"{path}: not UTF-8 text")


def _read_text(path: str) -> dict[str, list[str]]:
    seqs: dict[str, list[str]] = {}
    with open(path, encoding=ENCODING) as f:
        for lineno, line in enumerate(f, 1):
            fields = line.split()
            if not fields:
                continue
            if len(fields) < 2:
                raise DataFormatError(f"{path}, line {lineno}: expected 'user item [item ...]', "
                                      f"got {line.strip()!r} (no item)")
            # only a long line can hold an over-long id
            if len(line) > MAX_ID_DIGITS and (problem := next(filter(None, map(_id_problem, fields[1:])), None)):
                raise DataFormatError(f"{path}, line {lineno}: {problem}")
            seqs.setdefault(fields[0], []).extend(fields[1:])
    return seqs


def _number(path: str, lineno: int, name: str, text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise DataFormatError(f"{path}, line {lineno}: {name} {text!r} is not a number") from None
    if not math.isfinite(value):
        raise DataFormatError(f"{path}, line {lineno}: {name} {text!r} is not a finite number")
    return value


def _find_columns(path: str, header: list[str]) -> dict[str, int]:
    names = [h.strip().lower() for h in header]
    found = {}
    for column, aliases in _COLUMN_ALIASES.items():
        hits = [pos for pos, name in enumerate(names) if name in aliases]
        if hits:
            found[column] = hits[0]
        elif column != "rating":
            raise DataFormatError(f"{path}, line 1: header {header} has no {column!r} column "
                                  f"(accepted names: {', '.join(aliases)})")
    return found


def _read_table(path: str, delimiter: str, min_rating: float | None) -> dict[str, list[str]]:
    rows: dict[str, list[tuple[float, int, str]]] = {}
    with open(path, encoding=ENCODING, newline="") as f:
        reader = csv.reader(f, delimiter=delimiter)
        try:
            _read_rows(path, reader, min_rating, rows)
        except csv.Error as e:  # e.g. a field over csv.field_size_limit()
            raise DataFormatError(f"{path}, line {reader.line_num}: {e}") from None
    # ties in time keep file order
    return {user: [item for _, _, item in sorted(events)] for user, events in rows.items()}


def _read_rows(path: str, reader, min_rating: float | None, rows: dict) -> None:
    header = next(reader, None)
    if header is None:
        raise DataFormatError(f"{path}: the file is empty (a header row is required)")
    cols = _find_columns(path, header)
    if min_rating is not None and "rating" not in cols:
        raise DataFormatError(f"{path}, line 1: min_rating given but the header has no rating column")
    for row in reader:
        lineno = reader.line_num
        if not row or all(not c.strip() for c in row):
            continue
        if len(row) != len(header):
            raise DataFormatError(f"{path}, line {lineno}: expected {len(header)} fields like the "
                                  f"header, got {len(row)}")
        user, item = row[cols["user"]].strip(), row[cols["item"]].strip()
        if not user or not item:
            raise DataFormatError(f"{path}, line {lineno}: empty user or item id")
        if len(item) > MAX_ID_DIGITS and (problem := _id_problem(item)):
            raise DataFormatError(f"{path}, line {lineno}: {problem}")
        ts = _number(path, lineno, "timestamp", row[cols["timestamp"]])
        if min_rating is not None and _number(path, lineno, "rating", row[cols["rating"]]) < min_rating:
            continue
        rows.setdefault(user, []).append((ts, lineno, item))


def load_interactions(path: str | os.PathLike, format: str = "auto", *,
                      min_rating: float | None = None) -> SequenceData:
    """Read an interaction file (see the module docstring for the layouts).

    ``format="auto"`` picks csv/tsv by extension and text otherwise. ``min_rating`` keeps only
    CSV/TSV rows rated at least that much. Raises ``DataFormatError`` naming the line for
    malformed rows and ``FileNotFoundError`` for a missing file.
    """
    path = os.fspath(path)
    if format not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {format!r}")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"interaction file not found: {path}")
    if format == "auto":
        ext = os.path.splitext(path)[1].lower()
        format = {".csv": "csv", ".tsv": "tsv"}.get(ext, "text")
    if format == "text" and min_rating is not None:
        raise ValueError("min_rating needs a csv/tsv file with a rating column")
    try:
        raw = _read_text(path) if format == "text" else _read_table(path, "," if format == "csv" else "\t",
                                                                     min_rating)
    except UnicodeDecodeError:
        raise _undecodable(path) from None
    if not raw:
        raise DataFormatError(f"{path}: no interactions found")
    return from_sequences(raw)
