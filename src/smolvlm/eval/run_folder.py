"""A task's run folder, and writing and measuring helpers the evaluation and `smolvlm ablate` share.

    OUT/run.json           what was run (task, model, data, limits, dtype...): a different run refuses the folder
    OUT/predictions.jsonl  one line per example, appended and flushed per batch, so a stopped run resumes
    OUT/timing.jsonl       samples, seconds and peak memory of each session
    OUT/metrics.json       the scores, written atomically at the end
"""

from __future__ import annotations

import json
import os
import resource
from pathlib import Path

from smolvlm.errors import SmolVLMError
from smolvlm.files import atomic_write_text


class RunFolder:
    """One task's run folder (the files above); `done` holds the predictions made so far, by example id."""

    def __init__(self, folder: Path, identity: dict, fresh: bool):
        self.folder = folder
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise SmolVLMError(f"cannot create {folder} ({exc.strerror}); pass a writable --out") from None
        self.preds_path = folder / "predictions.jsonl"
        run_json = folder / "run.json"
        if fresh:
            for name in ("predictions.jsonl", "timing.jsonl", "metrics.json", "run.json"):
                (folder / name).unlink(missing_ok=True)
        if run_json.is_file():
            try:
                old = json.loads(run_json.read_text(encoding="utf-8"))
            except (OSError, json.JSONDecodeError, UnicodeDecodeError):
                old = None
            if old != identity:
                raise SmolVLMError(f"{folder} holds predictions of a different run ({run_json}); use another --out "
                                   "or pass --fresh to discard them")
        else:
            atomic_write_text(run_json, json.dumps(identity, indent=2) + "\n")
        self.done, good = _read_predictions(self.preds_path)
        if self.preds_path.is_file() and good < self.preds_path.stat().st_size:
            with open(self.preds_path, "r+b") as f:  # cut the partial tail so appends start on a fresh line
                f.truncate(good)
        self._file = open(self.preds_path, "a", encoding="utf-8")

    def add(self, rows: list[dict]) -> None:
        for row in rows:
            self._file.write(json.dumps(row) + "\n")
            self.done[str(row["id"])] = row
        self._file.flush()
        os.fsync(self._file.fileno())

    def add_timing(self, samples: int, seconds: float, peak_mb: float) -> None:
        with open(self.folder / "timing.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps({"samples": samples, "seconds": seconds, "peak_memory_mb": peak_mb}) + "\n")

    def timing(self) -> dict:
        rows = []
        path = self.folder / "timing.jsonl"
        if path.is_file():
            for line in path.read_text(encoding="utf-8").splitlines():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError:
                    continue
        samples = sum(r["samples"] for r in rows)
        seconds = sum(r["seconds"] for r in rows)
        peaks = [r["peak_memory_mb"] for r in rows if r.get("peak_memory_mb") is not None]
        return {"samples": samples, "seconds": round(seconds, 3),
                "samples_per_s": round(samples / seconds, 3) if seconds > 0 else None,
                "peak_memory_mb": round(max(peaks), 1) if peaks else None}

    def close(self) -> None:
        self._file.close()


def _read_predictions(path: Path) -> tuple[dict[str, dict], int]:
    """The rows of a predictions.jsonl by example id, and the length in bytes of its whole lines (a line cut
    short by a kill ends the file's good part: it and anything after it are redone)."""
    done: dict[str, dict] = {}
    if not path.is_file():
        return done, 0
    with open(path, "rb") as f:
        raw = f.read()
    good = 0
    for line in raw.split(b"\n"):
        if not line.endswith(b"}"):
            break
        try:
            row = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError):
            break
        done[str(row["id"])] = row
        good += len(line) + 1
    return done, good


def read_predictions(folder: Path) -> dict[str, dict]:
    """FOLDER/predictions.jsonl (a run folder's) by example id: {"id", "prediction" or "scores", ["error"]}."""
    return _read_predictions(Path(folder) / "predictions.jsonl")[0]


class PeakMemory:
    """Peak resident memory (MB) of this process while the block runs. On Linux the high-water mark
    is reset first (``/proc/self/clear_refs``), so each model/task gets its own peak; elsewhere it is
    the process's peak so far (``getrusage``)."""

    def __enter__(self):
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self.resettable = True
        except OSError:
            self.resettable = False
        return self

    def __exit__(self, *exc):
        self.mb = None
        if self.resettable:
            try:
                for line in Path("/proc/self/status").read_text().splitlines():
                    if line.startswith("VmHWM:"):
                        self.mb = int(line.split()[1]) / 1024
            except OSError:
                pass
        if self.mb is None:
            self.mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux
        return False
