"""Checkpoint files: the format, atomic save, safe load, averaging, RNG states.

A checkpoint is a dict of tensors and plain Python values written with ``torch.save`` and read with
``torch.load(weights_only=True)``, so loading never runs code from the file. It is written through
``mt.files.atomic_write``: a crash leaves the previous file or the new one, never a truncated one.
Where checkpoints live in a run directory, and which are kept, is ``mt.run``'s business.
"""

from __future__ import annotations

import random
from pathlib import Path

import torch

from mt.errors import MtError
from mt.files import atomic_write

FORMAT_VERSION = 1


class CheckpointError(MtError):
    """A checkpoint cannot be read or is not an mt checkpoint; the message names the file."""


def atomic_save(obj: dict, path: str | Path) -> Path:
    """Write ``obj`` to ``path`` so that readers see the old file or the complete new one."""
    path = Path(path)
    with atomic_write(path, "wb") as f:
        torch.save(obj, f)
    return path


def load(path: str | Path, map_location: str | torch.device = "cpu", mmap: bool = False) -> dict:
    """Read a checkpoint safely (no code execution); errors name the file. ``mmap``: tensors stay in
    the file until touched (to read its plain values cheaply)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
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
    """The Python and torch generators, and the current CUDA device's (one per rank: a node with
    another number of GPUs resumes too)."""
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda")
    if cuda is not None and torch.cuda.is_available():
        if isinstance(cuda, (list, tuple)):  # every device's, as checkpoints held before
            cuda = cuda[torch.cuda.current_device()] if torch.cuda.current_device() < len(cuda) else None
        if cuda is not None:
            torch.cuda.set_rng_state(cuda)
