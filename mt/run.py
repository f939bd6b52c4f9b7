"""The run directory: the one owner of its layout and of every file ``mt`` writes into it.

::

    RUN/config.yaml             the resolved config, written when training starts
    RUN/spm.model               the joint SentencePiece model (spm.src.model + spm.tgt.model if separate)
    RUN/checkpoints/            step_00001000.pt ... (the newest train.keep_checkpoints), last.pt,
                                best.pt, average.pt (training's average), average_lastN.pt (mt average)
    RUN/metrics.jsonl           one JSON row per training log, validation and end of training
    RUN/train.log               everything training printed, each line with its time (appended on resume)
    RUN/decode.yaml             the decoding defaults chosen on the validation split
    RUN/tensorboard/            metrics.jsonl's rows as TensorBoard events (train.tensorboard: true)
    RUN/.mt-manifest.json       the files mt wrote here: a failed start removes those, and only those
    RUN/.mt-lock                held while a process trains here (pid, host, start time)

``Run`` builds every one of these paths; no other module spells them. It also holds the rules:
a training run holds the lock from start to end (a second ``mt train`` on a live directory is
refused; a lock left by a killed process on the same host is taken over); a file at one of these
names that mt did not write is never overwritten or deleted (training is refused instead, unless it
is the tokenizer the config names, which is then used in place); checkpoints are saved, pruned,
resolved and averaged here; and ``load_for_inference`` is how translation, tuning, export and
evaluation read a model.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import NamedTuple

import torch
import yaml

from mt import checkpoint as ckpt
from mt import config as configs
from mt.config import Config, ConfigError, config_from_dict, save_config
from mt.device import choose_dtype, pick_device, slow_bf16_warning
from mt.errors import MtError
from mt.files import atomic_copy, atomic_write, pid_namespace
from mt.int8 import quantize_int8
from mt.int8 import unavailable as int8_unavailable
from mt.model import Transformer
from mt.tokenizer import Tokenizer

_STEP_FILE = re.compile(r"^step_(\d+)\.pt$")
_DEFAULT_KEYS = {"checkpoint": str, "beam": int, "lenpen": float}


class RunError(MtError):
    """The run directory cannot be used as asked; the message names the path and what to do."""


class Loaded(NamedTuple):
    """A model ready to translate, with the config it was trained with and its tokenizers."""

    model: Transformer
    config: Config
    src_tok: Tokenizer
    tgt_tok: Tokenizer


def _process_start(pid: int) -> str:
    """When process ``pid`` started (clock ticks since boot, from /proc), or '' where unknown: a lock
    names its holder by pid and start, so a new process that reuses the pid is not taken for it."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return ""
    return stat.rsplit(")", 1)[-1].split()[19]  # field 22 of proc(5); the name in () may hold spaces


def _alive(pid: int, start: str) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return not start or _process_start(pid) in ("", start)


def checkpoint_config(path: Path, state: dict) -> Config:
    """The config a checkpoint was trained with; an invalid one is an error naming the file."""
    try:
        return config_from_dict(state.get("config") or {})
    except ConfigError as e:
        raise ckpt.CheckpointError(f"{path}: its config is invalid: {e}") from None


def check_weights(path: Path, state: dict, cfg: Config) -> None:
    """The checkpoint's tensors have exactly the names and shapes its config implies. Checked on the
    meta device (nothing is allocated) before any model is built, so a tiny crafted file cannot make
    mt allocate a huge model, and a mismatch is one line naming the file, not a traceback."""
    try:
        src_vocab, tgt_vocab = int(state["vocab"]["src"]), int(state["vocab"]["tgt"])
    except (KeyError, TypeError, ValueError):
        raise ckpt.CheckpointError(f"{path}: no vocabulary sizes; not a checkpoint written by mt train") from None
    with torch.device("meta"):
        expected = Transformer(cfg.model, src_vocab, tgt_vocab, joint=cfg.tokenizer.joint).state_dict()
    weights = state["model"]
    if not isinstance(weights, dict) or set(weights) != set(expected):
        names = set(weights) if isinstance(weights, dict) else set()
        raise ckpt.CheckpointError(f"{path}: its weights are not the model its config describes (missing "
                                   f"{sorted(set(expected) - names)[:3]}, unexpected {sorted(names - set(expected))[:3]})")
    for name, tensor in expected.items():
        got = weights[name]
        if not torch.is_tensor(got) or got.shape != tensor.shape:
            raise ckpt.CheckpointError(f"{path}: {name} has shape {tuple(getattr(got, 'shape', ()))}, its config "
                                       f"says {tuple(tensor.shape)}")


class RunLock:
    """An exclusive lock file, ``RUN/.mt-lock``, that works on shared file systems: the lock is
    published by a hard link (atomic on NFS too) of a complete temporary file, so it is never seen
    half-written; it records pid, host and process start time. A lock whose holder is gone (same
    host and pid namespace, no such process) is taken over by renaming it away, which only one
    contender can do; one whose holder cannot be checked from here (another host or container) is never
    taken."""

    def __init__(self, path: Path, name: str):
        self.path, self.name = path, name
        self.token = ""

    def acquire(self) -> None:
        me = {"pid": os.getpid(), "host": socket.gethostname(), "pidns": pid_namespace(),
              "start": _process_start(os.getpid()), "since": time.strftime("%Y-%m-%d %H:%M:%S"),
              "token": uuid.uuid4().hex}
        tmp = self.path.with_name(f"{self.path.name}.{me['token']}")
        tmp.write_text(json.dumps(me) + "\n", encoding="utf-8")
        try:
            for _ in range(5):
                try:
                    os.link(tmp, self.path)
                except FileExistsError:
                    self._take_over_if_stale()
                    continue
                except OSError:  # no hard links on this file system: exclusive create instead
                    try:
                        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
                    except FileExistsError:
                        self._take_over_if_stale()
                        continue
                    with os.fdopen(fd, "w", encoding="utf-8") as f:
                        f.write(json.dumps(me) + "\n")
                self.token = me["token"]
                return
        finally:
            tmp.unlink(missing_ok=True)
        raise RunError(f"{self.name}: could not take the lock {self.path}")

    @staticmethod
    def _read(path: Path) -> dict | None:
        """The holder recorded in ``path``; {} when there is no such file; None when it is not a lock
        mt wrote."""
        try:
            holder = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return {}
        except (OSError, ValueError):
            return None
        ok = isinstance(holder, dict) and isinstance(holder.get("pid"), int) and isinstance(holder.get("token"), str)
        return holder if ok else None

    def _holder(self) -> dict | None:
        return self._read(self.path)

    def _take_over_if_stale(self) -> None:
        holder = self._holder()
        if holder == {}:  # released meanwhile
            return
        if holder is None:
            try:
                fresh = time.time() - self.path.stat().st_mtime < 10
            except FileNotFoundError:
                return
            if fresh:  # an exclusive create whose content is still being written
                raise RunError(f"{self.name} is in use (its lock {self.path} is being taken)")
            raise RunError(f"{self.name}: {self.path} is not a lock written by mt; if no mt trains here, "
                           "delete it")
        host, pid = holder.get("host", "?"), holder["pid"]
        here = host == socket.gethostname() and holder.get("pidns", "") == pid_namespace()
        if not here:
            raise RunError(f"{self.name} is in use by pid {pid} on {host} (if that run is gone, delete "
                           f"{self.path})")
        if _alive(pid, str(holder.get("start", ""))):
            raise RunError(f"{self.name} is in use by pid {pid} on {host}")
        stale = self.path.with_name(f"{self.path.name}.stale{os.getpid()}.{uuid.uuid4().hex[:8]}")
        try:
            os.rename(self.path, stale)  # only one contender wins; the others find no lock to move
        except FileNotFoundError:
            return
        moved = self._read(stale)
        if (moved or {}).get("token") != holder["token"]:  # not the dead holder's: a live lock taken meanwhile
            try:
                os.link(stale, self.path)  # put it back
            except OSError:
                pass
            stale.unlink(missing_ok=True)
            raise RunError(f"{self.name} is in use by pid {(moved or {}).get('pid', '?')} on {host}")
        stale.unlink(missing_ok=True)

    def release(self) -> None:
        if self.token and (self._holder() or {}).get("token") == self.token:
            self.path.unlink(missing_ok=True)
        self.token = ""


class Run:
    """A run directory (see the module docstring for its layout)."""

    CONFIG = "config.yaml"
    METRICS = "metrics.jsonl"
    LOG = "train.log"
    DEFAULTS = "decode.yaml"
    MANIFEST = ".mt-manifest.json"
    LOCK = ".mt-lock"
    CHECKPOINTS = "checkpoints"
    TENSORBOARD = "tensorboard"
    NAMED = ("last", "best", "average")

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.lock = RunLock(self.path / self.LOCK, str(self.path))

    def __repr__(self) -> str:
        return f"Run({str(self.path)!r})"

    # ---------------------------------------------------------------------------------------------
    # Layout

    @property
    def config_path(self) -> Path:
        return self.path / self.CONFIG

    @property
    def metrics_path(self) -> Path:
        return self.path / self.METRICS

    @property
    def defaults_path(self) -> Path:
        return self.path / self.DEFAULTS

    @property
    def checkpoint_dir(self) -> Path:
        return self.path / self.CHECKPOINTS

    def tokenizer_paths(self, joint: bool) -> tuple[Path, Path]:
        """The (source, target) SentencePiece models; the same file when the vocabulary is joint."""
        if joint:
            return self.path / "spm.model", self.path / "spm.model"
        return self.path / "spm.src.model", self.path / "spm.tgt.model"

    def checkpoint_path(self, name: str) -> Path:
        """``last``, ``best``, ``average`` or another name of a checkpoint file of this run."""
        return self.checkpoint_dir / f"{name}.pt"

    def step_path(self, step: int) -> Path:
        return self.checkpoint_dir / f"step_{step:08d}.pt"

    def step_checkpoints(self) -> list[tuple[int, Path]]:
        """Step checkpoints ordered by the step in their name (never by mtime)."""
        if not self.checkpoint_dir.is_dir():
            return []
        found = [(int(m.group(1)), p) for p in self.checkpoint_dir.iterdir() if (m := _STEP_FILE.match(p.name))]
        return sorted(found)

    def _written_names(self) -> list[Path]:
        """Every fixed path training writes (step checkpoints are matched by pattern)."""
        names = [self.config_path, self.metrics_path, self.log_path, self.tensorboard_dir, self.defaults_path,
                 *self.tokenizer_paths(True),
                 *self.tokenizer_paths(False)]
        return names + [self.checkpoint_path(n) for n in self.NAMED]

    # ---------------------------------------------------------------------------------------------
    # What mt wrote here

    def _relative(self, path: Path) -> str | None:
        try:
            return Path(os.path.relpath(Path(path).absolute(), self.path.absolute())).as_posix()
        except ValueError:  # another drive
            return None

    def owned(self) -> set[str]:
        """Paths (relative to the run directory) of the files mt wrote here."""
        try:
            tree = json.loads((self.path / self.MANIFEST).read_text(encoding="utf-8"))
        except FileNotFoundError:
            return set()
        except (OSError, ValueError):
            raise RunError(f"{self.path / self.MANIFEST}: unreadable; it lists the files mt wrote in "
                           f"{self.path}: delete it only together with those files") from None
        return set(tree.get("files", []))

    def _set_owned(self, files: set[str]) -> None:
        with atomic_write(self.path / self.MANIFEST) as f:
            json.dump({"version": 1, "files": sorted(files)}, f, indent=0)

    def own(self, *paths: Path) -> None:
        """Record ``paths`` as written by mt, before they are written (a kill in between leaves an
        entry for a missing file: harmless)."""
        names = {r for p in paths if (r := self._relative(p)) and not r.startswith("..")}
        files = self.owned()
        if not names <= files:
            self._set_owned(files | names)

    def _disown(self, *paths: Path) -> None:
        names = {self._relative(p) for p in paths}
        files = self.owned()
        if names & files:
            self._set_owned(files - names)

    def write(self, path: Path, mode: str = "w"):
        """``atomic_write`` of a file of this run, recorded as mt's."""
        self.own(path)
        return atomic_write(path, mode)

    def remove(self, *paths: Path) -> None:
        """Delete files of this run, only those mt wrote."""
        files = self.owned()
        for path in paths:
            if self._relative(path) in files:
                path.unlink(missing_ok=True)
        self._disown(*paths)

    # ---------------------------------------------------------------------------------------------
    # Training's hold on the directory

    def open_for_training(self, resume: bool, in_place: tuple[Path, ...] = ()) -> None:
        """Create the directory, take the lock (held until ``close``), then: resuming, adopt the files
        of a run older than manifests; starting, refuse a finished run, remove what a failed start
        left (only files mt wrote) and refuse files at mt's names that mt did not write, except the
        tokenizer files ``in_place`` (the config names them: they are used where they are)."""
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            probe = self.path / f".write-test{os.getpid()}"
            probe.write_bytes(b"x")
            probe.unlink()
        except OSError as e:
            raise RunError(f"{self.path}: run directory is not writable ({e.strerror})") from None
        self.lock.acquire()
        try:
            self._check_files(resume, {p.resolve() for p in in_place})
        except BaseException:
            self.lock.release()
            raise

    def _check_files(self, resume: bool, in_place: set[Path]) -> None:
        last = self.checkpoint_path("last")
        if resume:
            if last.exists() and self._relative(last) not in self.owned():  # a run from before manifests
                self.own(*[p for p in self._written_names() if p.exists()], *[p for _, p in self.step_checkpoints()])
            return
        if last.exists() or self.step_checkpoints() or self.checkpoint_path("best").exists():
            raise RunError(f"{self.path}: already holds a trained run; pass --resume to continue it "
                           "or choose another run directory with -o")
        owned = self.owned()
        for name in owned:  # a start that died before its first checkpoint
            path = self.path / name
            if path.is_dir():  # RUN/tensorboard: mt writes all of it (a foreign one is refused below)
                shutil.rmtree(path)
            elif path.resolve() not in in_place:
                path.unlink(missing_ok=True)
        if owned:
            self._set_owned(set())
        foreign = [p for p in self._written_names() + [p for _, p in self.step_checkpoints()]
                   if p.exists() and p.resolve() not in in_place]
        if foreign:
            raise RunError(f"{foreign[0]}: not written by mt train here, and training would overwrite it; move "
                           f"it away or choose another run directory with -o")

    def close(self) -> None:
        self.lock.release()

    # ---------------------------------------------------------------------------------------------
    # Files of a training run

    def save_config(self, cfg: Config) -> None:
        self.own(self.config_path)
        save_config(cfg, self.config_path)

    def load_config(self) -> Config:
        return configs.load_config(self.config_path)

    def disk_check(self, model: torch.nn.Module) -> None:
        """Refuse to start when the disk cannot hold two checkpoints (weights + Adam moments each)."""
        need = 2 * 3 * sum(p.numel() * p.element_size() for p in model.parameters())
        free = shutil.disk_usage(self.path).free
        if free < need:
            raise RunError(f"{self.path}: only {free / 2**20:.0f} MiB free on disk; checkpoints need about "
                           f"{need / 2**20:.0f} MiB")

    @property
    def log_path(self) -> Path:
        return self.path / self.LOG

    def logging_to_file(self, log: Callable[[str], None]) -> Callable[[str], None]:
        """``log``, and each message also appended to RUN/train.log with the time it was logged."""
        self.own(self.log_path)

        def both(message: str) -> None:
            log(message)
            stamp = time.strftime("%Y-%m-%d %H:%M:%S")
            with open(self.log_path, "a", encoding="utf-8") as f:
                f.write("".join(f"{stamp} {line}\n" for line in message.splitlines() or [""]))

        return both

    def metrics_rows(self) -> list[dict]:
        """The rows of metrics.jsonl so far (read only)."""
        return MetricsLog(self.metrics_path).rows()

    @property
    def tensorboard_dir(self) -> Path:
        return self.path / self.TENSORBOARD

    def metrics(self, tensorboard: bool = False) -> MetricsLog:
        """The run's metrics.jsonl; with ``tensorboard``, its rows also go to RUN/tensorboard."""
        self.own(self.metrics_path, *([self.tensorboard_dir] if tensorboard else []))
        return MetricsLog(self.metrics_path, self.tensorboard_dir if tensorboard else None)

    def save_checkpoint(self, state: dict, step: int, *, best: bool, keep: int) -> Path:
        """Write step ``step``'s checkpoint, point last.pt (and best.pt) at it, keep the newest ``keep``
        step checkpoints."""
        path, last, best_path = self.step_path(step), self.checkpoint_path("last"), self.checkpoint_path("best")
        self.own(path, last, best_path)
        ckpt.atomic_save(state, path)
        atomic_copy(path, last)
        if best:
            atomic_copy(path, best_path)
        found = self.step_checkpoints()
        doomed = [p for _, p in found[: max(len(found) - keep, 0)]]
        for p in doomed:
            p.unlink(missing_ok=True)
        self._disown(*doomed)
        return path

    def resume_state(self, log: Callable[[str], None]) -> tuple[Path, dict]:
        """The newest readable checkpoint: last.pt, else the step checkpoints from the newest down."""
        candidates = [self.checkpoint_path("last")] + [p for _, p in reversed(self.step_checkpoints())]
        for path in candidates:
            if not path.exists():
                continue
            try:
                state = ckpt.load(path)
            except ckpt.CheckpointError as e:
                log(f"warning: {e}; trying an older checkpoint")
                continue
            if path != candidates[0]:
                log(f"falling back to {path}, the newest readable checkpoint")
            return path, state
        raise ckpt.CheckpointError(f"{self.checkpoint_dir}: no readable checkpoint to resume from")

    def resolve(self, which: str = "best") -> Path:
        """``best`` (last.pt when nothing was validated), ``last``, ``average``, a step number or a
        path -> a checkpoint file."""
        if which in self.NAMED:
            path = self.checkpoint_path(which)
            if which == "best" and not path.exists():
                path = self.checkpoint_path("last")
        elif which.isdigit():
            path = self.step_path(int(which))
        else:
            path = Path(which)
        if not path.is_file():
            raise ckpt.CheckpointError(f"{path}: no such checkpoint (choose best, last, average, a step or a path)")
        return path

    # ---------------------------------------------------------------------------------------------
    # Averaging

    def average_last(self, n: int, out: Path | None = None) -> Path:
        """Average the last ``n`` step checkpoints into ``out`` (default checkpoints/average.pt)."""
        found = self.step_checkpoints()
        if n < 2 or len(found) < n:
            raise ckpt.CheckpointError(f"{self.checkpoint_dir}: averaging the last {n} needs at least {max(2, n)} "
                                       f"step checkpoints, found {len(found)}")
        return self._average([p for _, p in found[-n:]], out or self.checkpoint_path("average"))

    def average_best(self, n: int, metric: str, out: Path | None = None) -> Path:
        """Average the ``n`` step checkpoints with the best validation ``metric`` (bleu: highest, nll: lowest)."""
        scored = []
        for step, path in self.step_checkpoints():
            valid = ckpt.load(path).get("valid") or {}
            if metric in valid:
                scored.append((valid[metric], step, path))
        if n < 2 or len(scored) < n:
            raise ckpt.CheckpointError(f"{self.checkpoint_dir}: averaging the {n} best by validation {metric} "
                                       f"needs at least {max(2, n)} validated step checkpoints, found {len(scored)}")
        scored.sort(key=lambda item: (-item[0] if metric == "bleu" else item[0], -item[1]))
        chosen = sorted(scored[:n], key=lambda item: item[1])  # in step order
        return self._average([p for _, _, p in chosen], out or self.checkpoint_path("average"))

    def average_name(self, kind: str, n: int) -> Path:
        """Where ``mt average`` writes by default: never average.pt, which is training's (and
        decode.yaml may point to it)."""
        return self.checkpoint_path(f"average_{kind}{n}")

    def _average(self, paths: list[Path], out: Path) -> Path:
        state = ckpt.average(paths)
        state["averaged"] = [p.name for p in paths]
        state.pop("optimizer", None)  # an average is for translating, not for resuming
        self.own(out)
        return ckpt.atomic_save(state, out)

    # ---------------------------------------------------------------------------------------------
    # Decoding defaults (decode.yaml)

    def read_defaults(self) -> dict:
        """The decoding defaults chosen on validation ({} when none): checkpoint, beam, lenpen."""
        path = self.defaults_path
        if not path.exists():
            return {}
        try:
            tree = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as e:
            raise ckpt.CheckpointError(f"{path}: invalid YAML ({getattr(e, 'problem', e)})") from None
        if not isinstance(tree, dict):
            raise ckpt.CheckpointError(f"{path}: expected a mapping with checkpoint, beam and lenpen")
        chosen = {}
        for key, kind in _DEFAULT_KEYS.items():
            if key not in tree:
                continue
            value = tree[key]
            if kind is float and isinstance(value, int) and not isinstance(value, bool):
                value = float(value)
            if key == "checkpoint" and isinstance(value, int) and not isinstance(value, bool):
                value = str(value)  # a step number
            if not isinstance(value, kind) or isinstance(value, bool):
                raise ckpt.CheckpointError(f"{path}: {key}: expected {kind.__name__}, got {value!r}")
            chosen[key] = value
        return chosen

    def write_defaults(self, defaults: dict) -> Path:
        with self.write(self.defaults_path) as f:
            f.write("# chosen on the validation split by mt train; mt translate and mt eval use these defaults\n")
            yaml.safe_dump(defaults, f, sort_keys=False)
        return self.defaults_path

    def has_defaults(self) -> bool:
        return self.defaults_path.exists()

    def drop_tuning(self) -> None:
        """The model changed: the defaults chosen for the old one and training's average no longer hold."""
        self.remove(self.defaults_path, self.checkpoint_path("average"))

    # ---------------------------------------------------------------------------------------------
    # Reading a model

    def tokenizers(self, cfg: Config) -> tuple[Tokenizer, Tokenizer]:
        src, tgt = self.tokenizer_paths(cfg.tokenizer.joint)
        return Tokenizer(src), Tokenizer(tgt)

    def load_for_inference(self, checkpoint: str | None = None, dtype: str | None = None, device: str = "auto",
                           average: int = 0, warn: Callable[[str], None] | None = None) -> Loaded:
        """A model in eval mode to translate with, from this directory alone. ``checkpoint`` None: the
        one chosen on validation (decode.yaml), else best; ``average`` N >= 2: the mean of the last N
        step checkpoints instead. ``dtype`` None: the run's ``decode.dtype``; fp32; bf16 (``warn`` is
        told when this CPU only emulates it); int8 (CPU kernels: ``device`` auto means the CPU, and
        a CUDA device is refused); auto: the fastest of them on the device (``choose_dtype``)."""
        if average > 1:
            found = self.step_checkpoints()
            if len(found) < average:
                raise ckpt.CheckpointError(f"{self.checkpoint_dir}: --average {average} needs {average} step "
                                           f"checkpoints, found {len(found)}")
            path = found[-1][1]
            state = ckpt.average([p for _, p in found[-average:]])
        else:
            path = self.resolve(checkpoint or self.read_defaults().get("checkpoint", "best"))
            state = ckpt.load(path)
        cfg = checkpoint_config(path, state)
        dtype = replace(cfg.decode, dtype=dtype or cfg.decode.dtype).dtype  # validated: names the choices
        check_weights(path, state, cfg)
        src_tok, tgt_tok = self.tokenizers(cfg)
        trained_with = state.get("tokenizer") or {}  # absent from checkpoints before fingerprints
        if (src_tok.vocab_size, tgt_tok.vocab_size) != (state["vocab"]["src"], state["vocab"]["tgt"]) or \
                trained_with.get("src", src_tok.fingerprint) != src_tok.fingerprint or \
                trained_with.get("tgt", tgt_tok.fingerprint) != tgt_tok.fingerprint:
            raise ckpt.CheckpointError(f"{self.tokenizer_paths(cfg.tokenizer.joint)[0]}: not the tokenizer {path.name} "
                                       "was trained with")
        model = Transformer(cfg.model, src_tok.vocab_size, tgt_tok.vocab_size, joint=cfg.tokenizer.joint)
        model.load_state_dict(state["model"])
        target = pick_device("cpu" if dtype == "int8" and device == "auto" else device)
        if dtype == "auto":
            dtype = choose_dtype(dtype, target, int8_missing=int8_unavailable() if target.type == "cpu" else "")[0]
        model.to(target).eval()
        if dtype == "bf16":
            model.to(torch.bfloat16)
            warning = slow_bf16_warning(target)
            if warning and warn:
                warn(f"{warning} (--dtype fp32)")
        elif dtype == "int8":
            quantize_int8(model)
        return Loaded(model, cfg, src_tok, tgt_tok)


class MetricsLog:
    """Append-only JSON lines (``metrics.jsonl``), one row per log or validation event. With a
    ``tensorboard`` directory, each number of a train or valid row is also the TensorBoard scalar
    ``KIND/NAME`` at the row's step."""

    def __init__(self, path: Path, tensorboard: Path | None = None):
        self.path, self.tensorboard = path, tensorboard
        self._writer, self._purge_step = None, None

    def write(self, **row) -> None:
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")
        if self.tensorboard is not None and row.get("kind") in ("train", "valid"):
            self._open_writer()
            for name, value in row.items():
                if name not in ("kind", "step") and isinstance(value, (int, float)) and not isinstance(value, bool):
                    self._writer.add_scalar(f"{row['kind']}/{name}", value, row["step"])
            self._writer.flush()

    def _open_writer(self) -> None:
        if self._writer is None:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(str(self.tensorboard), purge_step=self._purge_step)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def _lines(self) -> Iterator[tuple[str, dict]]:
        """Each readable row with its line; a row torn by a kill mid-write is skipped."""
        for line in self.path.read_text(encoding="utf-8", errors="replace").splitlines(keepends=True):
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(row, dict):
                yield line, row

    def rows(self) -> list[dict]:
        """The rows logged so far, oldest first ([] before the first)."""
        return [row for _, row in self._lines()] if self.path.exists() else []

    def truncate_after(self, step: int) -> None:
        """Drop rows logged after ``step`` (by a run killed after its last checkpoint), atomically."""
        self._purge_step = step + 1  # TensorBoard hides the events a killed run logged after ``step``
        if self.tensorboard is not None:
            self._open_writer()  # now: even a resume that logs nothing more hides them
        if not self.path.exists():
            return
        kept = [line if line.endswith("\n") else line + "\n" for line, row in self._lines() if row.get("step", 0) <= step]
        with atomic_write(self.path) as f:
            f.write("".join(kept))
