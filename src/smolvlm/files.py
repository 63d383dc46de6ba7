"""Writing files so that a kill never leaves half of one: every file the project writes for a user (run folders,
checkpoints, metrics, reports, exported data) goes through here. A write goes to a temporary file in the same
folder (named `.NAME.*.tmp`: hidden, and ignored by whoever lists the folder's real files), is flushed to disk and
renamed over NAME in one step; on any error the temporary file is removed and NAME is as it was.

    with atomic_path(path) as tmp: torch.save(state, tmp)     # any writer that takes a path
    atomic_write_text(path, text)
    atomic_write_json(path, obj)
    atomic_write_jsonl(path, rows); read_jsonl(path)            # one JSON object per line
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A temporary path beside `path` to write to; renamed over `path` when the block ends without an error."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield Path(tmp)
        with open(tmp, "rb") as f:  # on disk before the rename: a crash after it never finds an empty file
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def atomic_write_json(path: str | Path, obj, indent: int | None = 2) -> None:
    atomic_write_text(path, json.dumps(obj, indent=indent) + "\n")


def atomic_write_jsonl(path: str | Path, rows: Iterable[dict]) -> None:
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in rows))


def read_jsonl(path: str | Path) -> list[dict]:
    """The objects of a JSON-lines file, blank lines skipped."""
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]
