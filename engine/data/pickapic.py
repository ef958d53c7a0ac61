"""Reader of Pick-a-Pic v2 parquet shards (local files and globs), winner first.

Two passes, so that bad input fails before any work is spent:
1. ``scan_pickapic`` reads only the cheap columns (caption, labels) of every file, checks the
   schema and values (errors name the file, row and field), drops ties and empty captions
   and counts them; it returns light references to the kept pairs.
2. ``iter_pair_images`` reads the image bytes of the referenced rows, shard by shard; rows
   whose bytes do not decode are skipped and counted, with the first row ids reported.
"""
from __future__ import annotations

import glob
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import pyarrow.parquet as pq

from engine.data.images import ImageDecodeError, decode_image

REQUIRED_COLUMNS = ("caption", "jpg_0", "jpg_1", "label_0", "label_1")
MAX_REPORTED_IDS = 10


class DataError(ValueError):
    """Malformed preference data; the message names the file, the row and the field."""


@dataclass(frozen=True)
class PairRef:
    """A kept row: where it is, its caption and which column holds the winner."""

    file: str
    row: int
    caption: str
    winner_col: str
    loser_col: str

    @property
    def row_id(self) -> str:
        return f"{Path(self.file).name}:{self.row}"


@dataclass
class LoadReport:
    """What the reader kept, dropped and skipped."""

    files: list[str] = field(default_factory=list)
    rows: int = 0
    kept: int = 0
    ties: int = 0
    empty_captions: int = 0
    undecodable: int = 0
    undecodable_ids: list[str] = field(default_factory=list)

    def note_undecodable(self, row_id: str) -> None:
        self.undecodable += 1
        self.kept -= 1
        if len(self.undecodable_ids) < MAX_REPORTED_IDS:
            self.undecodable_ids.append(row_id)

    def summary(self) -> str:
        text = (f"{self.rows} rows in {len(self.files)} file(s): kept {self.kept} pairs, dropped {self.ties} ties, "
                f"skipped {self.empty_captions} empty captions, {self.undecodable} undecodable images")
        if self.undecodable_ids:
            text += f" (first: {', '.join(self.undecodable_ids)})"
        return text


@dataclass
class PreferencePair:
    """A decoded-able pair held in memory (small data sets and tests)."""

    caption: str
    winner: bytes
    loser: bytes
    row_id: str


def expand_paths(patterns: list[str] | str) -> list[str]:
    """Files and globs -> sorted file list; a pattern that matches nothing is an error."""
    if isinstance(patterns, (str, os.PathLike)):
        patterns = [str(patterns)]
    files: list[str] = []
    for pattern in patterns:
        matches = sorted(glob.glob(os.path.expanduser(str(pattern))))
        if not matches:
            raise DataError(f"data.train: {pattern} matches no file")
        files.extend(matches)
    return files


def _check_labels(path: str, row: int, l0, l1) -> None:
    for name, value in (("label_0", l0), ("label_1", l1)):
        if value is None or not isinstance(value, (int, float)) or math.isnan(value):
            raise DataError(f"{path}: row {row}: field {name}: label is {value!r}, expected 0, 0.5 or 1")
        if value not in (0, 0.5, 1):
            raise DataError(f"{path}: row {row}: field {name}: label {value} not in (0, 0.5, 1)")
    if l0 + l1 != 1:
        raise DataError(f"{path}: row {row}: fields label_0/label_1: {l0} + {l1} != 1")


def scan_file(path: str, report: LoadReport) -> list[PairRef]:
    """Validate one file's schema and cheap columns; return its kept pairs."""
    try:
        schema = pq.read_schema(path)
    except Exception as err:
        raise DataError(f"{path}: not a readable parquet file ({err})") from None
    missing = [c for c in REQUIRED_COLUMNS if c not in schema.names]
    if missing:
        raise DataError(f"{path}: missing column(s) {missing}; Pick-a-Pic v2 needs {list(REQUIRED_COLUMNS)} "
                        f"(found {schema.names})")
    table = pq.read_table(path, columns=["caption", "label_0", "label_1"])
    captions = table.column("caption").to_pylist()
    labels0 = table.column("label_0").to_pylist()
    labels1 = table.column("label_1").to_pylist()
    refs = []
    for row, (caption, l0, l1) in enumerate(zip(captions, labels0, labels1)):
        report.rows += 1
        if not isinstance(caption, str):
            raise DataError(f"{path}: row {row}: field caption: expected a string, got {caption!r}")
        _check_labels(path, row, l0, l1)
        if l0 == 0.5:
            report.ties += 1
            continue
        if not caption.strip():
            report.empty_captions += 1
            continue
        winner, loser = ("jpg_0", "jpg_1") if l0 == 1 else ("jpg_1", "jpg_0")
        refs.append(PairRef(path, row, caption.strip(), winner, loser))
    report.files.append(path)
    return refs


def scan_pickapic(patterns: list[str] | str, max_pairs: int | None = None) -> tuple[list[PairRef], LoadReport]:
    """Pass 1 over all files (no image decoding): validated references to the kept pairs."""
    report = LoadReport()
    refs: list[PairRef] = []
    for path in expand_paths(patterns):
        refs.extend(scan_file(path, report))
    if max_pairs is not None:
        refs = refs[:max_pairs]
    report.kept = len(refs)
    if not refs:
        raise DataError(f"no usable preference pairs: {report.summary()}")
    return refs, report


class _FileCache:
    """Keeps the image columns of the most recently used parquet file in memory."""

    def __init__(self):
        self.path, self.columns = None, None

    def get(self, path: str) -> dict:
        if path != self.path:
            table = pq.read_table(path, columns=["jpg_0", "jpg_1"])
            self.path, self.columns = path, {c: table.column(c) for c in ("jpg_0", "jpg_1")}
        return self.columns


def iter_pair_images(refs: list[PairRef], report: LoadReport) -> Iterator[tuple[PairRef, object, object]]:
    """Pass 2: (ref, winner RGB array, loser RGB array); undecodable pairs skipped and counted."""
    cache = _FileCache()
    for ref in refs:
        cols = cache.get(ref.file)
        try:
            winner = decode_image(cols[ref.winner_col][ref.row].as_py())
            loser = decode_image(cols[ref.loser_col][ref.row].as_py())
        except ImageDecodeError:
            report.note_undecodable(ref.row_id)
            continue
        yield ref, winner, loser


def load_pickapic(patterns: list[str] | str, max_pairs: int | None = None) -> tuple[list[PreferencePair], LoadReport]:
    """Both passes, pairs held in memory as bytes (small sets, tests and tools)."""
    refs, report = scan_pickapic(patterns, max_pairs)
    cache = _FileCache()
    pairs = []
    for ref in refs:
        cols = cache.get(ref.file)
        winner, loser = cols[ref.winner_col][ref.row].as_py(), cols[ref.loser_col][ref.row].as_py()
        try:
            decode_image(winner), decode_image(loser)
        except ImageDecodeError:
            report.note_undecodable(ref.row_id)
            continue
        pairs.append(PreferencePair(ref.caption, winner, loser, ref.row_id))
    return pairs, report
