"""Atomic file writes: a file that exists is complete (temp file in the same folder + rename)."""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> Path:
    """Call ``write(tmp_path)`` then rename onto ``path``; the temp file is removed on failure."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def link_or_copy(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """Hard-link a file (no bytes copied; safe because files are only ever replaced by atomic
    writes, never rewritten in place), or copy it where a link cannot be made (another file
    system)."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def link_tree(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """A folder (or one file) duplicated by ``link_or_copy``, file by file."""
    src, dst = Path(src), Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    if src.is_dir():
        shutil.copytree(src, dst, copy_function=link_or_copy, dirs_exist_ok=True)
    else:
        link_or_copy(src, dst)


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    def write(tmp):
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=2, sort_keys=False, default=str)
            f.write("\n")
    return atomic_write(path, write)


def read_json(path: str | os.PathLike) -> Any:
    with open(path) as f:
        return json.load(f)


def write_safetensors(path: str | os.PathLike, tensors: dict, metadata: dict | None = None) -> Path:
    from safetensors.torch import save_file

    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    return atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))


def write_parquet(path: str | os.PathLike, table) -> Path:
    """``table``: a pyarrow Table or a dict of columns."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    if isinstance(table, dict):
        table = pa.table(table)
    return atomic_write(path, lambda tmp: pq.write_table(table, tmp))
