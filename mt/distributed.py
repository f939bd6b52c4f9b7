"""Several training processes under ``torchrun``: the process group, rank 0's side effects, and the
collective decisions (after PyTorch's DistributedDataParallel; gloo on CPU, nccl on CUDA).

``Dist.from_env`` reads torchrun's ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``; without them (or with one
process) every method is a cheap no-op, so the trainer has one code path. Only rank 0 writes
files; work that only rank 0 does (``on_main``) ends with a broadcast of its result or its error, so
the other ranks never wait for a rank that already failed.
"""

from __future__ import annotations

import datetime
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from mt.config import ConfigError
from mt.errors import MtError
from mt.tokenizer import cores

T = TypeVar("T")


class DistributedError(MtError):
    """Another rank failed; the message is its error."""


@dataclass
class Dist:
    """This process's place in the run: ``rank`` of ``world`` (``local_rank`` on its machine)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @classmethod
    def from_env(cls) -> Dist:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        return cls(rank=int(os.environ.get("RANK", "0")), world=world, local_rank=int(os.environ.get("LOCAL_RANK", "0")))

    @property
    def on(self) -> bool:
        return self.world > 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def device(self, name: str) -> str:
        """The device this rank trains on: its own GPU under torchrun with CUDA, else ``name``."""
        if self.on and name.startswith("cuda:"):
            raise ConfigError(f"train.device={name}: under torchrun each rank takes the GPU of its local rank; "
                              "use train.device=cuda (or auto)")
        if self.on and name in ("auto", "cuda") and torch.cuda.is_available():
            return f"cuda:{self.local_rank}"
        return name

    def start(self, device: torch.device, timeout_s: float) -> None:
        """Join the process group (nccl for CUDA, gloo otherwise). ``timeout_s`` bounds every
        collective, so it must outlast what rank 0 does alone (data preparation, validation)."""
        if not self.on:
            return
        if device.type == "cuda":
            torch.cuda.set_device(device)
        # DDP's constructor imports torch._dynamo, which imports torch._inductor; imported while a process
        # group exists, that keeps the group alive after destroy_process_group (torch 2.13), and so its gloo
        # threads, which then can die at the interpreter's exit with "terminate called without an active
        # exception" (SIGABRT, seen once in CI). Imported before the group exists, it holds none.
        import torch._dynamo  # noqa: F401
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                timeout=datetime.timedelta(seconds=timeout_s))

    def stop(self) -> None:
        if self.on and dist.is_initialized():
            dist.destroy_process_group()

    # collectives ----------------------------------------------------------------------------------

    def broadcast(self, value: T) -> T:
        """Rank 0's ``value`` on every rank."""
        if not self.on:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def on_main(self, fn: Callable[[], T]) -> T:
        """``fn()`` on rank 0, its result on every rank; if it raises, every rank raises (rank 0 its
        own error, the others a ``DistributedError`` with its message)."""
        if not self.on:
            return fn()
        outcome: tuple[str, Any] = ("ok", None)
        if self.main:
            try:
                outcome = ("ok", fn())
            except BaseException as e:
                self.broadcast(("error", f"{type(e).__name__}: {e}" if not isinstance(e, MtError) else str(e)))
                raise
        status, value = self.broadcast(outcome)
        if status == "error":
            raise DistributedError(f"rank 0 failed: {value}")
        return value

    def sum(self, values: list[float]) -> list[float]:
        """Element-wise sum over ranks (in float64)."""
        if not self.on:
            return values
        t = torch.tensor(values, dtype=torch.float64)
        dist.all_reduce(t)
        return t.tolist()

    def max(self, values: list[float]) -> list[float]:
        """Element-wise maximum over ranks (in float64): any rank's flag, signal number or clock."""
        if not self.on:
            return values
        t = torch.tensor(values, dtype=torch.float64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return t.tolist()

    def gather(self, value: T) -> list[T]:
        """Every rank's ``value``, in rank order, on every rank."""
        if not self.on:
            return [value]
        out: list = [None] * self.world
        dist.all_gather_object(out, value)
        return out

    def barrier(self) -> None:
        if self.on:
            dist.barrier()


def quiet_unless_main(d: Dist, log: Callable[[str], None]) -> Callable[[str], None]:
    """Rank 0 logs; the other ranks say nothing (one log per run, not one per rank)."""
    return log if d.main else (lambda message: None)


def launched() -> bool:
    """Whether this process is one rank of several (torchrun, or ``launch``)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(nproc: int, argv: list[str], grace_s: float = 60.0) -> int:
    """``mt train --nproc N``: run ``mt train ARGV`` as N processes on this machine, with the
    environment torchrun gives its workers (RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR/PORT; each rank
    gets cores / N threads unless OMP_NUM_THREADS says otherwise). Unlike torchrun's agent, it adds
    nothing to the ranks' own output and returns the status of the first rank that failed: rank 0
    says what went wrong on one ``mt: error:`` line. SIGINT/SIGTERM go to every rank (they stop at
    the same step and save); a rank that fails first gives the others ``grace_s`` to end, then they
    are killed."""
    port = _free_port()
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": str(nproc),
           "LOCAL_WORLD_SIZE": str(nproc)}
    env.setdefault("OMP_NUM_THREADS", str(max(1, cores() // nproc)))
    procs: list[subprocess.Popen] = []

    def forward(signum, frame) -> None:
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signum)

    # the ranks get a session of their own, so a Ctrl-C reaches each once (from here), not twice
    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGINT, signal.SIGTERM)}
    first: int | None = None  # the exit status of the first rank seen to fail
    try:
        for rank in range(nproc):
            procs.append(subprocess.Popen([sys.executable, "-m", "mt", "train", *argv], start_new_session=True,
                                          env={**env, "RANK": str(rank), "LOCAL_RANK": str(rank)}))
        failed_at = None
        while True:
            codes = [proc.poll() for proc in procs]
            if first is None:
                first = next((code for code in codes if code not in (None, 0)), None)
                failed_at = time.time() if first is not None else None
            if all(code is not None for code in codes):
                break
            if failed_at is not None and time.time() - failed_at > grace_s:
                for proc in procs:
                    if proc.poll() is None:
                        proc.kill()
            time.sleep(0.05)
    finally:
        for proc in procs:  # never leave a rank behind (an exception here, a second Ctrl-C)
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if first is None:
        return 0
    return 128 - first if first < 0 else first
