"""Pass 2 of the Pick-a-Pic reader reads only the row groups that hold the selected rows.

Bytes are counted where they leave the file: every read of a shard goes through
``pickapic.open_shard``, which these tests replace by a ``pyarrow.PythonFile`` over a file
object whose ``read`` / ``readinto`` / ``readall`` add up what the OS returned.

Measured with pyarrow 26.0.1 (the fixture below: 3 files x 300 rows of noise PNGs of ~12 KB, a
random 6% of all rows; bytes read / the selected rows' jpg_0 + jpg_1 bytes):

    row_group_size                         1      2      8      64     default (1 group / file)
    read_image_cells (pre_buffer on/off)   1.65   2.36   6.67   16.8   16.8
    read_table, whole columns (before)     17.7   17.3   16.9   16.8   16.8
    pyarrow.dataset take                   18.3   17.7   17.0   17.0   17.0

With one row per group, 0.5 of the 0.65 above 1 is the footers (less with bigger images).
``pre_buffer`` and ``buffer_size`` change nothing (pyarrow reads a column chunk whole), and
``dataset.take`` reads every row group. pyarrow's writer checks the page size once per
1024-value batch, so a pyarrow-written binary column chunk of up to 1024 rows is one page (one
dictionary page, with the default dictionary encoding): skipping pages would not beat skipping
row groups on such files.
"""
from __future__ import annotations

import io
import itertools

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from sail.engine.data import pickapic
from sail.engine.data.pickapic import IMAGE_COLUMNS, iter_pair_bytes, scan_pickapic
from tests.datagen import pickapic_rows

FRACTION = 0.06
PYARROW_FOOTER_READ = 64 * 1024        # pyarrow reads the last 64 KiB of a file to find its footer


class CountingFile(io.FileIO):
    """A read-only file that adds every byte the OS returns to ``counter["bytes"]``."""

    def __init__(self, path, counter):
        super().__init__(path, "rb")
        self.counter = counter

    def read(self, size=-1):
        data = super().read(size)
        self.counter["bytes"] += len(data)
        return data

    def readall(self):
        data = super().readall()
        self.counter["bytes"] += len(data)
        return data

    def readinto(self, buffer):
        n = super().readinto(buffer)
        self.counter["bytes"] += n or 0
        return n


@pytest.fixture
def bytes_read(monkeypatch):
    """{"bytes": read so far, "opened": paths}: every shard opened by the reader is counted."""
    counter = {"bytes": 0, "opened": []}

    def open_counted(path):
        counter["opened"].append(path)
        return pa.PythonFile(CountingFile(path, counter), mode="r")

    monkeypatch.setattr(pickapic, "open_shard", open_counted)
    return counter


@pytest.fixture(scope="module")
def columns():
    """3 files' worth of Pick-a-Pic v2 rows with incompressible (noise PNG) images of ~12 KB."""
    return [pickapic_rows(300, seed=i, size=(64, 64)) for i in range(3)]


def write_shards(folder, columns, row_group_size) -> list[str]:
    """The files as pyarrow writes them by default (snappy, dictionary encoding, statistics),
    with ``row_group_size`` rows per group (None: pyarrow's default, one group here)."""
    paths = []
    for i, cols in enumerate(columns):
        path = str(folder / f"train-{i:05d}.parquet")
        pq.write_table(pa.table(cols), path, row_group_size=row_group_size)
        paths.append(path)
    return paths


def random_selection(refs, seed=0):
    """A random ``FRACTION`` of the refs, in scan order (how a seed set reaches pass 2)."""
    chosen = np.random.default_rng(seed).choice(len(refs), size=round(FRACTION * len(refs)), replace=False)
    return [refs[i] for i in sorted(chosen)]


def image_bytes(selected, columns, paths) -> int:
    by_path = dict(zip(paths, columns))
    return sum(len(by_path[ref.file][c][ref.row]) for ref in selected for c in IMAGE_COLUMNS)


def touched_row_group_bytes(selected) -> int:
    """Compressed jpg_0 + jpg_1 column chunks of the row groups holding a selected row, plus per
    file what pyarrow reads to find and parse the footer."""
    total = 0
    for path, run in itertools.groupby(selected, key=lambda ref: ref.file):
        meta = pq.ParquetFile(path).metadata
        starts = np.cumsum([0] + [meta.row_group(g).num_rows for g in range(meta.num_row_groups)])
        groups = {int(np.searchsorted(starts, ref.row, side="right")) - 1 for ref in run}
        names = [meta.schema.column(j).name for j in range(meta.num_columns)]
        image_cols = [names.index(c) for c in IMAGE_COLUMNS]
        total += sum(meta.row_group(g).column(j).total_compressed_size for g in groups for j in image_cols)
        total += PYARROW_FOOTER_READ + meta.serialized_size + 8
    return total


def uneven_shard(path, cols) -> str:
    """Row groups of 5, 0, 13 and 22 rows (a writer fed uneven batches)."""
    table = pa.table(cols)
    with pq.ParquetWriter(path, table.schema) as writer:
        for start, stop in ((0, 5), (5, 5), (5, 18), (18, 40)):
            writer.write_table(table.slice(start, stop - start))
    return str(path)


def test_pair_bytes_are_the_cells_of_a_whole_column_read(tmp_path):
    """Every selected row's winner and loser bytes equal those of today's whole-column read, for
    files of one row per group, groups of 7, uneven groups (one empty), one group per file; with
    a null cell, bytes that are no image, and refs that go back to a file already read."""
    cols = pickapic_rows(40, seed=3)
    cols["jpg_0"][6] = None                          # row 6 (label_0 = 1): a null winner
    cols["jpg_1"][17] = b"not an image"              # row 17 (label_0 = 0): the winner
    paths = [str(tmp_path / "one.parquet"), str(tmp_path / "seven.parquet"),
             uneven_shard(tmp_path / "uneven.parquet", cols), str(tmp_path / "default.parquet")]
    pq.write_table(pa.table(cols), paths[0], row_group_size=1)
    pq.write_table(pa.table(cols), paths[1], row_group_size=7)
    pq.write_table(pa.table(cols), paths[3])
    assert [pq.ParquetFile(p).metadata.num_row_groups for p in paths] == [40, 6, 4, 1]
    assert pq.ParquetFile(paths[2]).metadata.row_group(1).num_rows == 0
    refs, _ = scan_pickapic(paths)
    rng = np.random.default_rng(1)
    edges = {0, 4, 5, 6, 7, 17, 18, 39}                # group edges, the null cell, the bad bytes
    selected = [ref for ref in refs if ref.row in edges or rng.random() < 0.3]
    selected += [ref for ref in refs if ref.file == paths[0]][:3]       # back to the first file
    whole = {p: pq.read_table(p, columns=list(IMAGE_COLUMNS)) for p in paths}
    got = list(iter_pair_bytes(selected))
    assert [ref for ref, _, _ in got] == selected
    for ref, winner, loser in got:
        assert winner == whole[ref.file].column(ref.winner_col)[ref.row].as_py(), ref.row_id
        assert loser == whole[ref.file].column(ref.loser_col)[ref.row].as_py(), ref.row_id
    winners = {(ref.file, ref.row): winner for ref, winner, _ in got}
    assert all(winners[(p, 6)] is None and winners[(p, 17)] == b"not an image" for p in paths)


@pytest.mark.parametrize("row_group_size", [1, 2, 8, 64, None])
def test_image_pass_reads_only_the_row_groups_of_the_selection(tmp_path, columns, bytes_read, row_group_size):
    """A random 6% of 900 rows in 3 files: the bytes read are at most the image column chunks
    of the row groups that hold a selected row (plus the footers), and at most twice the
    selected images with one row per group."""
    paths = write_shards(tmp_path, columns, row_group_size)
    refs, _ = scan_pickapic(paths)
    selected = random_selection(refs)
    need = image_bytes(selected, columns, paths)
    bytes_read["bytes"] = 0
    got = list(iter_pair_bytes(selected))
    read = bytes_read["bytes"]
    assert len(got) == len(selected) and read >= need         # the images came through the counted files
    assert read <= touched_row_group_bytes(selected), (read, need)
    if row_group_size == 1:
        assert read <= 2 * need, f"read {read} bytes for {need} bytes of selected images ({read / need:.2f}x)"


def test_encode_pass_reads_at_most_twice_the_selected_images(tmp_path, bytes_read, one_thread):
    """The whole pre-encoding pass (pass 1's cheap columns and footers included) over a 6%
    ``data.select`` of 3 files with one row per group and images of ~28 KB: at most 2x the
    selected images' bytes read, and the cache holds exactly the selected pairs."""
    from sail.engine.config import DataConfig
    from sail.engine.data.cache import PairCache
    from sail.engine.data.encode import encode_pickapic
    from sail.engine.models import build_components

    columns = [pickapic_rows(200, seed=10 + i, size=(96, 96)) for i in range(3)]
    paths = write_shards(tmp_path, columns, row_group_size=1)
    refs, _ = scan_pickapic(paths)
    selected = random_selection(refs, seed=2)
    pq.write_table(pa.table({"file": [ref.file for ref in selected], "row": [ref.row for ref in selected]}),
                   tmp_path / "select.parquet")
    need = image_bytes(selected, columns, paths)
    cfg = DataConfig(train=[str(tmp_path / "train-*.parquet")], select=str(tmp_path / "select.parquet"),
                     resolution=16, decode_workers=2)
    bytes_read["bytes"] = 0
    cache = PairCache(encode_pickapic(cfg, build_components("tiny-sd15", seed=0), tmp_path / "cache",
                                      progress=False))
    read = bytes_read["bytes"]
    assert cache.sources == [ref.row_id for ref in selected]
    assert sorted(set(bytes_read["opened"])) == paths
    assert need <= read <= 2 * need, f"read {read} bytes for {need} bytes of selected images ({read / need:.2f}x)"
