"""The run directory while training: start-up checks (writable, not already a finished run, room for
checkpoints), the metrics log, and stopping cleanly on SIGINT/SIGTERM."""

from __future__ import annotations

import json
import shutil
import signal
import threading
from pathlib import Path

import torch

from mt import tune


class TrainingError(RuntimeError):
    """Training cannot go on; the message says why."""


class StopSignals:
    """The first SIGINT/SIGTERM asks training to stop after the current update (and save); a second
    one interrupts at once. Only the main thread can own signal handlers; elsewhere this does nothing."""

    def __init__(self):
        self.received = 0
        self._previous: dict[int, object] = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        self.received = signum
        self._restore()

    def _restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def __exit__(self, *exc) -> None:
        self._restore()


def check_disk_space(run_dir: Path, model: torch.nn.Module) -> None:
    """Refuse to start when the disk cannot hold two checkpoints (weights + Adam moments each)."""
    checkpoint_bytes = 3 * sum(p.numel() * p.element_size() for p in model.parameters())
    free = shutil.disk_usage(run_dir).free
    if free < 2 * checkpoint_bytes:
        raise TrainingError(f"{run_dir}: only {free / 2**20:.0f} MiB free on disk; checkpoints need about "
                            f"{2 * checkpoint_bytes / 2**20:.0f} MiB")


class MetricsLog:
    """Append-only JSON lines (``metrics.jsonl``), one row per log or validation event."""

    def __init__(self, path: Path):
        self.path = path

    def write(self, **row) -> None:
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")

    def truncate_after(self, step: int) -> None:
        """Drop rows logged after ``step`` (by a run killed after its last checkpoint), atomically."""
        if not self.path.exists():
            return
        kept = []
        for line in self.path.read_text(encoding="utf-8", errors="replace").splitlines(keepends=True):
            try:
                row = json.loads(line)
            except json.JSONDecodeError:  # a row torn by a kill mid-write
                continue
            if row.get("step", 0) <= step:
                kept.append(line if line.endswith("\n") else line + "\n")
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text("".join(kept), encoding="utf-8")
        tmp.replace(self.path)


def check_run_dir(run_dir: Path, resume: bool) -> None:
    """Fail at start, not after an hour: the run directory must be writable and, unless resuming,
    must not already hold a run."""
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / ".write-test"
        probe.write_bytes(b"x")
        probe.unlink()
    except OSError as e:
        raise TrainingError(f"{run_dir}: run directory is not writable ({e.strerror})") from None
    if not resume and (run_dir / "checkpoints" / "last.pt").exists():
        raise TrainingError(f"{run_dir}: already holds a trained run; pass --resume to continue it "
                            "or choose another run directory with -o")
    if not resume:  # an earlier attempt that died before its first checkpoint: start clean
        for name in ("metrics.jsonl", "spm.model", "spm.src.model", "spm.tgt.model", tune.DEFAULTS_FILE,
                     "checkpoints/average.pt"):
            (run_dir / name).unlink(missing_ok=True)
