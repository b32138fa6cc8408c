"""Interaction files -> per-user item sequences with contiguous ids.

Two layouts are read: whitespace text where each line is ``user item [item ...]`` (one
interaction per line in time order, as in SASRec's ``ml-1m.txt``, or one whole sequence per
line), and CSV/TSV with a header naming user, item and timestamp columns (rating optional).
Items get ids ``1..N`` (0 is padding) in order of their raw ids, so already-contiguous
datasets keep their numbering.
"""
from __future__ import annotations

import csv
import os
from dataclasses import dataclass

import numpy as np

FORMATS = ("auto", "text", "csv", "tsv")

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


def _sort_key(raw: str):
    # numeric ids in numeric order, anything else after them in string order
    return (0, int(raw), "") if raw.lstrip("-").isdigit() else (1, 0, raw)


def from_sequences(raw_sequences: dict[str, list[str]]) -> SequenceData:
    """Remap raw per-user sequences (ordered by user as given) to contiguous item ids."""
    raw_items = sorted({i for seq in raw_sequences.values() for i in seq}, key=_sort_key)
    index = {raw: pos + 1 for pos, raw in enumerate(raw_items)}
    sequences = [np.fromiter((index[i] for i in seq), dtype=np.int64, count=len(seq))
                 for seq in raw_sequences.values()]
    return SequenceData(sequences, raw_items, list(raw_sequences))


def _read_text(path: str) -> dict[str, list[str]]:
    seqs: dict[str, list[str]] = {}
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            fields = line.split()
            if not fields:
                continue
            if len(fields) < 2:
                raise DataFormatError(f"{path}, line {lineno}: expected 'user item [item ...]', "
                                      f"got {line.strip()!r} (no item)")
            seqs.setdefault(fields[0], []).extend(fields[1:])
    return seqs


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
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.reader(f, delimiter=delimiter)
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
            try:
                ts = float(row[cols["timestamp"]])
            except ValueError:
                raise DataFormatError(f"{path}, line {lineno}: timestamp {row[cols['timestamp']]!r} "
                                      "is not a number") from None
            if min_rating is not None:
                try:
                    rating = float(row[cols["rating"]])
                except ValueError:
                    raise DataFormatError(f"{path}, line {lineno}: rating {row[cols['rating']]!r} "
                                          "is not a number") from None
                if rating < min_rating:
                    continue
            rows.setdefault(user, []).append((ts, lineno, item))
    # ties in time keep file order
    return {user: [item for _, _, item in sorted(events)] for user, events in rows.items()}


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
    if format == "text":
        if min_rating is not None:
            raise ValueError("min_rating needs a csv/tsv file with a rating column")
        raw = _read_text(path)
    else:
        raw = _read_table(path, "," if format == "csv" else "\t", min_rating)
    if not raw:
        raise DataFormatError(f"{path}: no interactions found")
    return from_sequences(raw)
