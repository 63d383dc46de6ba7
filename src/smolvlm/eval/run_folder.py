"""A task's run folder (claimed and logged with smolvlm.run_folder), and the memory measure the evaluation and
`smolvlm ablate` share (PeakMemory).

    OUT/run.json           what was run (task, model, data, limits, dtype...): a different run refuses the folder
    OUT/predictions.jsonl  one line per example, appended and flushed per batch, so a stopped run resumes
    OUT/timing.jsonl       samples, seconds and peak memory of each session
    OUT/metrics.json       the scores, written atomically at the end
"""

from __future__ import annotations

import resource
from pathlib import Path

from smolvlm.run_folder import JsonlLog, claim

_FILES = ("predictions.jsonl", "timing.jsonl", "metrics.json", "run.json")  # what --fresh discards


class RunFolder:
    """One task's run folder (the files above); `done` holds the predictions made so far, by example id."""

    def __init__(self, folder: Path, identity: dict, fresh: bool):
        self.folder = folder
        claim(folder, identity, discard=_FILES if fresh else (),
              different="{folder} holds predictions of a different run ({run_json}); use another --out or pass "
                        "--fresh to discard them")
        self._predictions = JsonlLog(folder / "predictions.jsonl", fsync=True)
        self._timing = JsonlLog(folder / "timing.jsonl")
        self.done = {str(row["id"]): row for row in self._predictions.open()}

    def add(self, rows: list[dict]) -> None:
        self._predictions.append(*rows)
        for row in rows:
            self.done[str(row["id"])] = row

    def add_timing(self, samples: int, seconds: float, peak_mb: float) -> None:
        self._timing.open()
        try:
            self._timing.append({"samples": samples, "seconds": seconds, "peak_memory_mb": peak_mb})
        finally:
            self._timing.close()

    def timing(self) -> dict:
        rows = self._timing.read()
        samples = sum(r["samples"] for r in rows)
        seconds = sum(r["seconds"] for r in rows)
        peaks = [r["peak_memory_mb"] for r in rows if r.get("peak_memory_mb") is not None]
        return {"samples": samples, "seconds": round(seconds, 3),
                "samples_per_s": round(samples / seconds, 3) if seconds > 0 else None,
                "peak_memory_mb": round(max(peaks), 1) if peaks else None}

    def close(self) -> None:
        self._predictions.close()


def read_predictions(folder: Path) -> dict[str, dict]:
    """FOLDER/predictions.jsonl (a run folder's) by example id: {"id", "prediction" or "scores", ["error"]}; a line
    cut short by a kill ends the file's good part (it and anything after it are redone)."""
    return {str(row["id"]): row for row in JsonlLog(Path(folder) / "predictions.jsonl").read()}


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
