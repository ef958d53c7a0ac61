"""Reader of Pick-a-Pic v2 parquet shards (local files and globs), winner first.

Two passes, so that bad input fails before any work is spent:
1. ``scan_pickapic`` reads only the cheap columns (caption, labels, has_label) of every file
   and checks the schema (a missing column or an unreadable file is an error naming the file).
   It drops ties, unlabelled rows (``has_label`` false) and empty captions and counts them; it
   returns light references to the kept pairs.
2. ``iter_pair_bytes`` reads the image bytes of the referenced rows, shard by shard, and only
   the row groups that hold them (``read_image_cells``); rows whose bytes do not decode are
   skipped and counted, with the first row ids reported.

Bad rows: one malformed row (an unreadable caption or label) in a 959K-row data set is
skipped, counted and named (file:row and field) in the load report, like an undecodable image.
More bad rows than ``max_bad_fraction`` of all rows is an error (the data is systematically
wrong, not noisy); ``strict`` refuses the data at its first bad row.
"""
from __future__ import annotations

import bisect
import contextlib
import glob
import itertools
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from sail.engine.data.images import ImageDecodeError, decode_image
from sail.engine.errors import InputError

REQUIRED_COLUMNS = ("caption", "jpg_0", "jpg_1", "label_0", "label_1")
IMAGE_COLUMNS = ("jpg_0", "jpg_1")
MAX_REPORTED_IDS = 10
DEFAULT_MAX_BAD_FRACTION = 0.01


class DataError(InputError):
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
    unlabelled: int = 0
    empty_captions: int = 0
    malformed: int = 0
    malformed_ids: list[str] = field(default_factory=list)
    undecodable: int = 0
    undecodable_ids: list[str] = field(default_factory=list)

    def note_malformed(self, row_id: str, problem: str) -> None:
        self.malformed += 1
        if len(self.malformed_ids) < MAX_REPORTED_IDS:
            self.malformed_ids.append(f"{row_id} ({problem})")

    def note_undecodable(self, row_id: str) -> None:
        self.undecodable += 1
        self.kept -= 1
        if len(self.undecodable_ids) < MAX_REPORTED_IDS:
            self.undecodable_ids.append(row_id)

    def summary(self) -> str:
        text = (f"{self.rows} rows in {len(self.files)} file(s): kept {self.kept} pairs, dropped {self.ties} ties, "
                f"{self.unlabelled} unlabelled rows (has_label false), {self.empty_captions} empty captions; "
                f"skipped {self.malformed} malformed rows, {self.undecodable} pairs with undecodable images")
        if self.malformed_ids:
            text += f"; first malformed: {', '.join(self.malformed_ids)}"
        if self.undecodable_ids:
            text += f"; first undecodable: {', '.join(self.undecodable_ids)}"
        return text

    def check_bad_fraction(self, max_bad_fraction: float) -> None:
        """Malformed rows plus undecodable pairs above ``max_bad_fraction`` of all rows: an error."""
        bad = self.malformed + self.undecodable
        if self.rows and bad > max_bad_fraction * self.rows:
            raise DataError(f"data.train: {bad} of {self.rows} rows are bad ({bad / self.rows:.2%}), more than "
                            f"data.max_bad_fraction {max_bad_fraction:.2%}: {self.summary()}")


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


def open_shard(path: str) -> pa.NativeFile:
    """Open one parquet file of ``data.train`` for reading: every read of a shard goes through
    here (tests wrap it to count the bytes really read from disk)."""
    return pa.OSFile(path)


def row_problem(caption, l0, l1, has_label) -> str | None:
    """What is wrong with one row's cheap fields ("field label_0: label is None, ..."), or None."""
    if not isinstance(caption, str):
        return f"field caption: expected a string, got {caption!r}"
    if not isinstance(has_label, bool):
        return f"field has_label: expected true/false, got {has_label!r}"
    for name, value in (("label_0", l0), ("label_1", l1)):
        if value is None or isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
            return f"field {name}: label is {value!r}, expected 0, 0.5 or 1"
        if value not in (0, 0.5, 1):
            return f"field {name}: label {value} not in (0, 0.5, 1)"
    if l0 + l1 != 1:
        return f"fields label_0/label_1: {l0} + {l1} != 1"
    return None


def scan_file(path: str, report: LoadReport, strict: bool = False) -> list[PairRef]:
    """Validate one file's schema and cheap columns; return its kept pairs.

    Policy: ``has_label`` false (no vote recorded) drops the row as unlabelled whatever its
    labels say; ties (0.5 / 0.5) are dropped; a malformed row is skipped and counted (``strict``:
    an error naming the file, row and field)."""
    with contextlib.ExitStack() as stack:
        try:
            shard = pq.ParquetFile(stack.enter_context(open_shard(path)))
        except Exception as err:
            raise DataError(f"{path}: not a readable parquet file ({err})") from None
        schema = shard.schema_arrow
        missing = [c for c in REQUIRED_COLUMNS if c not in schema.names]
        if missing:
            raise DataError(f"{path}: missing column(s) {missing}; Pick-a-Pic v2 needs {list(REQUIRED_COLUMNS)} "
                            f"(found {schema.names})")
        columns = ["caption", "label_0", "label_1"] + (["has_label"] if "has_label" in schema.names else [])
        try:
            table = shard.read(columns=columns)
        except Exception as err:
            raise DataError(f"{path}: cannot read columns {columns} ({err})") from None
    captions = table.column("caption").to_pylist()
    labels0 = table.column("label_0").to_pylist()
    labels1 = table.column("label_1").to_pylist()
    has_label = table.column("has_label").to_pylist() if "has_label" in columns else [True] * len(captions)
    refs = []
    for row, (caption, l0, l1, labelled) in enumerate(zip(captions, labels0, labels1, has_label)):
        report.rows += 1
        problem = row_problem(caption, l0, l1, labelled)
        if problem is not None:
            if strict:
                raise DataError(f"{path}: row {row}: {problem} (data.strict)")
            report.note_malformed(f"{Path(path).name}:{row}", problem)
            continue
        if not labelled:
            report.unlabelled += 1
            continue
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


def read_selection(path: str) -> set[tuple[str, int]]:
    """(file, row) pairs of a selection parquet (``data.select``): its rows with role "seed" when
    it has a role column (a recipe's split.parquet), else all of them."""
    try:
        t = pq.read_table(path).to_pydict()
    except (OSError, pa.ArrowInvalid) as err:
        raise DataError(f"data.select: {path}: cannot read ({type(err).__name__}: {err})") from None
    missing = [c for c in ("file", "row") if c not in t]
    if missing:
        raise DataError(f"data.select: {path}: missing column(s) {missing}")
    roles = t.get("role", ["seed"] * len(t["file"]))
    return {(os.path.abspath(f), int(r)) for f, r, role in zip(t["file"], t["row"], roles) if role == "seed"}


def scan_pickapic(patterns: list[str] | str, max_pairs: int | None = None, *,
                  max_bad_fraction: float = DEFAULT_MAX_BAD_FRACTION,
                  strict: bool = False, select: str | None = None) -> tuple[list[PairRef], LoadReport]:
    """Pass 1 over all files (no image decoding): validated references to the kept pairs
    (only the rows of the ``select`` parquet when given). More malformed rows than
    ``max_bad_fraction`` of all rows is a ``DataError``."""
    report = LoadReport()
    refs: list[PairRef] = []
    for path in expand_paths(patterns):
        refs.extend(scan_file(path, report, strict))
    report.check_bad_fraction(max_bad_fraction)
    if select is not None:
        chosen = read_selection(select)
        refs = [r for r in refs if (os.path.abspath(r.file), r.row) in chosen]
    if max_pairs is not None:
        refs = refs[:max_pairs]
    report.kept = len(refs)
    if not refs:
        raise DataError(f"no usable preference pairs: {report.summary()}")
    return refs, report


def read_image_cells(path: str, rows: list[int]) -> dict[int, dict[str, bytes | None]]:
    """{row: {"jpg_0": bytes, "jpg_1": bytes}} for ``rows`` of one file, reading only the
    ``jpg_0`` / ``jpg_1`` column chunks of the row groups that hold them, one group at a time.

    The row group is the smallest unit pyarrow can read: it reads a column chunk whole and has
    no row-level take on a file; and its writer pages binary columns per 1024-value batch (with
    dictionary encoding, up to 1024 rows' values sit in one dictionary page), so skipping pages
    would not help on pyarrow-written files. A random 6% of the rows thus costs about
    1 - 0.94 ** rows_per_group of the image bytes: little with 1-2 rows per group, everything
    with one group per file (measured: tests/engine/data/test_selective_reads.py).
    """
    with open_shard(path) as source:
        shard = pq.ParquetFile(source)
        sizes = [shard.metadata.row_group(g).num_rows for g in range(shard.num_row_groups)]
        starts = list(itertools.accumulate(sizes, initial=0))       # first row of each group; total last
        by_group: dict[int, list[int]] = {}
        for row in sorted(set(rows)):
            if not 0 <= row < starts[-1]:
                raise DataError(f"{path}: row {row} is out of range ({starts[-1]} rows): the file changed "
                                "after it was scanned")
            by_group.setdefault(bisect.bisect_right(starts, row) - 1, []).append(row)
        cells: dict[int, dict[str, bytes | None]] = {}
        for group, group_rows in by_group.items():
            table = shard.read_row_group(group, columns=list(IMAGE_COLUMNS))
            local = pa.array([row - starts[group] for row in group_rows])
            values = {c: table.column(c).take(local).to_pylist() for c in IMAGE_COLUMNS}
            for i, row in enumerate(group_rows):
                cells[row] = {c: values[c][i] for c in IMAGE_COLUMNS}
    return cells


def iter_pair_bytes(refs: list[PairRef]) -> Iterator[tuple[PairRef, bytes | None, bytes | None]]:
    """(ref, winner bytes, loser bytes) for every ref, in order; each run of consecutive refs in
    one file is read with one ``read_image_cells`` call."""
    for path, run in itertools.groupby(refs, key=lambda ref: ref.file):
        run = list(run)
        cells = read_image_cells(path, [ref.row for ref in run])
        for ref in run:
            yield ref, cells[ref.row][ref.winner_col], cells[ref.row][ref.loser_col]


def iter_pair_images(refs: list[PairRef], report: LoadReport) -> Iterator[tuple[PairRef, object, object]]:
    """Pass 2: (ref, winner RGB array, loser RGB array); undecodable pairs skipped and counted."""
    for ref, winner_bytes, loser_bytes in iter_pair_bytes(refs):
        try:
            winner = decode_image(winner_bytes)
            loser = decode_image(loser_bytes)
        except ImageDecodeError:
            report.note_undecodable(ref.row_id)
            continue
        yield ref, winner, loser


def load_pickapic(patterns: list[str] | str, max_pairs: int | None = None, *,
                  max_bad_fraction: float = DEFAULT_MAX_BAD_FRACTION,
                  strict: bool = False) -> tuple[list[PreferencePair], LoadReport]:
    """Both passes, pairs held in memory as bytes (small sets, tests and tools)."""
    refs, report = scan_pickapic(patterns, max_pairs, max_bad_fraction=max_bad_fraction, strict=strict)
    pairs = []
    for ref, winner, loser in iter_pair_bytes(refs):
        try:
            decode_image(winner), decode_image(loser)
        except ImageDecodeError as err:
            if strict:
                raise DataError(f"{ref.file}: row {ref.row}: undecodable image ({err}) (data.strict)") from None
            report.note_undecodable(ref.row_id)
            continue
        pairs.append(PreferencePair(ref.caption, winner, loser, ref.row_id))
    report.check_bad_fraction(max_bad_fraction)
    return pairs, report
