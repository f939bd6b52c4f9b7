"""Checkpoints: atomic save, safe load, the run directory's checkpoint layout, keep-N pruning.

A checkpoint is a dict of tensors and plain Python values written with ``torch.save`` and read with
``torch.load(weights_only=True)``, so loading never runs code from the file. It is written to a
temporary file in the same directory, flushed and fsynced, then renamed over the target: a crash
leaves the previous file or the new one, never a truncated one.

Layout: ``RUN_DIR/checkpoints/step_00001000.pt`` (keep-N), ``last.pt`` and ``best.pt``. Also here:
the RNG states a checkpoint carries, finding the newest readable checkpoint to resume from, and
averaging the weights of several checkpoints.
"""

from __future__ import annotations

import os
import random
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import torch

FORMAT_VERSION = 1
_STEP_FILE = re.compile(r"^step_(\d+)\.pt$")


class CheckpointError(ValueError):
    """A checkpoint cannot be read or is not an mt checkpoint; the message names the file."""


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_save(obj: dict, path: str | Path) -> Path:
    """Write ``obj`` to ``path`` so that readers see the old file or the complete new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    _fsync_dir(path.parent)
    return path


def atomic_copy(src: Path, dst: Path) -> None:
    """Copy a finished checkpoint under another name, atomically (for last.pt / best.pt)."""
    tmp = dst.with_name(f".{dst.name}.tmp{os.getpid()}")
    try:
        shutil.copyfile(src, tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, dst)
    finally:
        tmp.unlink(missing_ok=True)
    _fsync_dir(dst.parent)


def load(path: str | Path, map_location: str | torch.device = "cpu") -> dict:
    """Read a checkpoint safely (no code execution); errors name the file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # pickle refused, truncated zip, not a torch file...
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if "weights_only" in str(e) or "Unsupported global" in str(e):
            reason = "it contains Python objects that could run code when loaded (refused)"
        raise CheckpointError(f"{path}: not a readable mt checkpoint: {reason}") from None
    if not isinstance(state, dict) or state.get("format") != "mt" or "model" not in state:
        raise CheckpointError(f"{path}: not an mt checkpoint")
    if state.get("version", 0) > FORMAT_VERSION:
        raise CheckpointError(f"{path}: written by a newer mt (format {state['version']} > {FORMAT_VERSION})")
    return state


def step_checkpoints(directory: str | Path) -> list[tuple[int, Path]]:
    """Step checkpoints in ``directory`` ordered by the step in their name (never by mtime)."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = []
    for p in directory.iterdir():
        m = _STEP_FILE.match(p.name)
        if m:
            found.append((int(m.group(1)), p))
    return sorted(found)


def step_path(directory: str | Path, step: int) -> Path:
    return Path(directory) / f"step_{step:08d}.pt"


def prune(directory: str | Path, keep: int) -> list[Path]:
    """Delete all but the ``keep`` newest step checkpoints; return what was deleted."""
    found = step_checkpoints(directory)
    doomed = [p for _, p in found[: max(len(found) - keep, 0)]]
    for p in doomed:
        p.unlink(missing_ok=True)
    return doomed


def resolve(run_dir: str | Path, which: str = "best") -> Path:
    """``best``, ``last``, ``average``, a step number or a path -> a checkpoint file of ``run_dir``."""
    ckpt_dir = Path(run_dir) / "checkpoints"
    if which in ("best", "last", "average"):
        path = ckpt_dir / f"{which}.pt"
        if which == "best" and not path.exists():
            path = ckpt_dir / "last.pt"
    elif which.isdigit():
        path = step_path(ckpt_dir, int(which))
    else:
        path = Path(which)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint (choose best, last, average, a step or a path)")
    return path


def average(paths: list[Path]) -> dict:
    """Element-wise mean of the model weights of ``paths`` (same shapes); other state from the last."""
    states = [load(p) for p in paths]
    averaged = {}
    for key, value in states[-1]["model"].items():
        if value.is_floating_point():
            averaged[key] = sum(s["model"][key].double() for s in states).div(len(states)).to(value.dtype)
        else:
            averaged[key] = value
    return {**states[-1], "model": averaged}


def rng_state() -> dict:
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def load_resume_state(ckpt_dir: Path, log: Callable[[str], None]) -> tuple[Path, dict]:
    """The newest readable checkpoint: last.pt, else the step checkpoints from the newest down."""
    candidates = [ckpt_dir / "last.pt"] + [p for _, p in reversed(step_checkpoints(ckpt_dir))]
    for path in candidates:
        if not path.exists():
            continue
        try:
            state = load(path)
        except CheckpointError as e:
            log(f"warning: {e}; trying an older checkpoint")
            continue
        if path != candidates[0]:
            log(f"falling back to {path}, the newest readable checkpoint")
        return path, state
    raise CheckpointError(f"{ckpt_dir}: no readable checkpoint to resume from")
