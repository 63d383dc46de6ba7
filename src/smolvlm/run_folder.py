"""Run folders: the folder OUT a training run or an evaluation writes into, claimed by one run at a time, and the
append-only JSON-lines logs in it that a kill may cut mid-line.

    OUT/run.json    the record of the run that owns the folder (what it computes); written atomically when the
                    folder is claimed, compared with the wanted run when it is claimed again (claim)
    OUT/NAME.jsonl  a log: one JSON object per line, appended and flushed row by row (JsonlLog); reading stops at
                    the first line a kill cut short, and reopening cuts the file back to the whole lines before it

The trainer's folder (smolvlm.train.run_dir: metrics.jsonl) and an evaluation's (smolvlm.eval.run_folder:
predictions.jsonl, timing.jsonl) are both made of these; each says its own policy and words its own refusals.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable
from pathlib import Path

from smolvlm.errors import SmolVLMError
from smolvlm.files import atomic_write_json, atomic_write_jsonl


def claim(folder: Path, record: dict, *, different: str, existing: str | None = None, unreadable: str | None = None,
          foreign: str | None = None, same: Callable[[dict], object] = lambda record: record,
          discard: Iterable[str] = ()) -> bool:
    """Claim FOLDER for the run `record` describes: create it, and write the record to FOLDER/run.json unless the
    folder holds this run already. Returns whether it did (the run continues there).

    The policy is in the refusals. Each is the message of the SmolVLMError raised in its case, a str.format
    template with the fields {folder}, {run_json} and {difference} (the first key that differs, "k.k: A there,
    B now"); None allows the case:
      different   run.json records another run (always refused)
      existing    run.json records a run, this one or another (None: continue this one; another is `different`)
      unreadable  run.json is not JSON or not shaped like a record (None: it counts as another run)
      foreign     the folder holds files but no run.json (None: claim it anyway)
    `same` picks what of a record must match (default: all of it), e.g. leaving out what may change between
    sessions; `discard` names files deleted before the folder is looked at (a fresh start).
    """
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise SmolVLMError(f"cannot create {folder} ({exc.strerror}); pass a writable --out") from None
    for name in discard:
        (folder / name).unlink(missing_ok=True)
    run_json = folder / "run.json"
    fields = {"folder": folder, "run_json": run_json, "difference": ""}
    if not run_json.is_file():
        # a kill's leftover temporary file (files.py: hidden, .NAME.*.tmp) is no one's run
        if foreign is not None and any(not (p.name.startswith(".") and p.name.endswith(".tmp"))
                                       for p in folder.iterdir()):
            raise SmolVLMError(foreign.format(**fields))
        atomic_write_json(run_json, record)
        return False
    try:
        found = same(json.loads(run_json.read_bytes()))
    except (OSError, ValueError, KeyError, TypeError, AttributeError):  # not JSON, or not shaped as `same` reads
        if unreadable is not None:
            raise SmolVLMError(unreadable.format(**fields)) from None
        raise SmolVLMError(different.format(**{**fields, "difference": f"{run_json} is unreadable"})) from None
    if existing is not None:
        raise SmolVLMError(existing.format(**fields))
    wanted = same(record)
    if found != wanted:
        raise SmolVLMError(different.format(**{**fields, "difference": first_difference(found, wanted)}))
    return True


def first_difference(there, now, path: str = "") -> str:
    """The first key (dotted path, sorted order) where two records differ: "optim.lr: 0.003 there, 0.001 now"."""
    if isinstance(there, dict) and isinstance(now, dict):
        for k in sorted(set(there) | set(now)):
            if there.get(k) != now.get(k):
                return first_difference(there.get(k), now.get(k), f"{path}.{k}" if path else k)
    return f"{path}: {there!r} there, {now!r} now"


class JsonlLog:
    """An append-only JSON-lines file a kill may cut mid-line. Its good part is its lines up to the first that is
    not a whole JSON object (cut short, or unreadable): read() returns those rows; open() cuts the file back to
    them first, so that appended rows start on a fresh line. `fsync`: append() also forces each batch to disk,
    so that it survives a machine's crash, not only a process's kill."""

    def __init__(self, path: Path, fsync: bool = False):
        self.path = Path(path)
        self.fsync = fsync
        self._file = None

    def read(self) -> list[dict]:
        return self._scan()[0]

    def cut(self, keep: Callable[[dict], bool] | None = None) -> list[dict]:
        """Cut the file back to its good part, or to the rows of it `keep` accepts; returns the rows kept."""
        rows, good = self._scan()
        if keep is not None:
            rows = [r for r in rows if keep(r)]
            atomic_write_jsonl(self.path, rows)  # rows may go from the middle: the file is rewritten, whole or not
            return rows
        size = self.path.stat().st_size if self.path.is_file() else 0
        if good < size:
            with open(self.path, "r+b") as f:
                f.truncate(good)
        elif good > size:  # the last row was written whole, its newline not
            with open(self.path, "ab") as f:
                f.write(b"\n")
        return rows

    def open(self, keep: Callable[[dict], bool] | None = None) -> list[dict]:
        """cut(keep), then open the file for append(); returns the rows kept."""
        rows = self.cut(keep)
        self._file = open(self.path, "a", encoding="utf-8")
        return rows

    def append(self, *rows: dict) -> None:
        """Write rows, one line each, and flush them (a kill then loses at most a row being written)."""
        for row in rows:
            self._file.write(json.dumps(row) + "\n")
        self._file.flush()
        if self.fsync:
            os.fsync(self._file.fileno())

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def _scan(self) -> tuple[list[dict], int]:
        """The good rows, and the length in bytes of the good part (a last row without its newline counted with
        one, so a length past the file's end says the newline is missing)."""
        if not self.path.is_file():
            return [], 0
        rows: list[dict] = []
        good = 0
        for line in self.path.read_bytes().split(b"\n"):
            try:
                row = json.loads(line)
            except ValueError:  # cut short by a kill, or not text: it and what follows are not trusted
                break
            if not isinstance(row, dict):
                break
            rows.append(row)
            good += len(line) + 1
        return rows, good
