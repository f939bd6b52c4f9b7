"""The tokenized corpus cache: compact id arrays on disk, built once in parallel, read without mapping.

One cache is a directory (after fairseq's binarised datasets, without its text copy):

    meta.json          version, pair and token counts, the id type, what it was built from
    src.ids, tgt.ids   every sentence's ids (pieces + ``</s>``) end to end: uint16 for vocabularies of
                       up to 65,536 pieces, else uint32
    src.idx, tgt.idx   int64 offsets, pairs + 1 of them: sentence i is ``ids[idx[i]:idx[i + 1]]``
    flags              one byte per pair: ``CONTROL`` (a side holds control characters), ``DUPLICATE``
                       (the same pair came earlier; only when built with ``dedup``)

It is built under a temporary name and renamed into place when complete, so a cache from a killed
build is never read. Reading never memory-maps the files: lengths come out of the offsets as whole
numpy arrays, chunk by chunk, and a batch's rows are read with ``pread``, so a process's memory does
not grow with the corpus or with the pages it has touched.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import os
import pickle
import queue
import re
import shutil
import socket
import struct
import subprocess
import sys
import threading
import uuid
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import numpy as np

from mt.errors import MtError
from mt.files import fsync_dir, pid_namespace
from mt.tokenizer import EOS_ID, Tokenizer

VERSION = 1
CONTROL, DUPLICATE = 1, 2  # bits of ``flags``
CONTROL_CHARS = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")  # C0 (but tab and newline), DEL, C1
SIDES = ("src", "tgt")
READ_CHUNK = 1 << 20  # pairs per chunk when reading whole columns


class CacheError(MtError):
    """A tokenized cache is unreadable; the message names it."""


# --------------------------------------------------------------------------------------------------
# Encoding (in worker processes)


def _ids(tok: Tokenizer, texts: list[str], dtype: np.dtype) -> tuple[np.ndarray, np.ndarray]:
    """Ids of ``texts`` end to end, each sentence followed by ``</s>``, and the lengths (``</s>`` included)."""
    pieces = tok.sp.encode(texts, out_type=int, num_threads=1)  # one process per core already
    lengths = np.fromiter(map(len, pieces), dtype=np.int64, count=len(pieces)) + 1
    ids = np.empty(int(lengths.sum()), dtype=dtype)
    ends = np.cumsum(lengths) - 1
    keep = np.ones(len(ids), dtype=bool)
    keep[ends] = False
    ids[keep] = np.fromiter(itertools.chain.from_iterable(pieces), dtype=dtype, count=len(ids) - len(pieces))
    ids[ends] = EOS_ID
    return ids, lengths


def pair_hash(src: str, tgt: str) -> int:
    """A 64-bit digest of a pair, the same in every process (``hash`` is salted per process)."""
    digest = hashlib.blake2b(src.encode("utf-8") + b"\0" + tgt.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little")


class _Encoder:
    """Turns a chunk of text pairs into the arrays the cache stores."""

    def __init__(self, src_tok: Tokenizer, tgt_tok: Tokenizer, dtype: np.dtype, dedup: bool):
        self.src_tok, self.tgt_tok, self.dtype, self.dedup = src_tok, tgt_tok, dtype, dedup

    def __call__(self, chunk: tuple[list[str], list[str]]) -> dict:
        src, tgt = chunk
        src_ids, src_len = _ids(self.src_tok, src, self.dtype)
        tgt_ids, tgt_len = _ids(self.tgt_tok, tgt, self.dtype)
        flags = np.zeros(len(src), dtype=np.uint8)
        if CONTROL_CHARS.search("\n".join(src)) or CONTROL_CHARS.search("\n".join(tgt)):  # rare: look closer
            control = (bool(CONTROL_CHARS.search(s) or CONTROL_CHARS.search(t)) for s, t in zip(src, tgt))
            flags = np.fromiter(control, dtype=np.uint8, count=len(src)) * np.uint8(CONTROL)
        out = {"src_ids": src_ids, "src_len": src_len, "tgt_ids": tgt_ids, "tgt_len": tgt_len, "flags": flags}
        if self.dedup:
            out["hash"] = np.fromiter(map(pair_hash, src, tgt), dtype=np.uint64, count=len(src))
        return out


def _send(stream, obj: object) -> None:
    data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    stream.write(struct.pack("<Q", len(data)) + data)
    stream.flush()


def _receive(stream) -> object:
    header = stream.read(8)
    if len(header) < 8:
        raise EOFError
    (size,) = struct.unpack("<Q", header)
    return pickle.loads(stream.read(size))


def _serve() -> None:
    """A tokenizing process (``python -m mt.cache``): an encoder, then chunks on stdin; encoded
    chunks (or the exception) on stdout."""
    stdin, stdout = sys.stdin.buffer, sys.stdout.buffer
    encoder = _receive(stdin)
    while True:
        try:
            chunk = _receive(stdin)
        except EOFError:
            return
        try:
            _send(stdout, ("ok", encoder(chunk)))
        except Exception as e:  # the parent raises it
            _send(stdout, ("error", e))


class _Workers:
    """``n`` tokenizing processes started with ``python -m mt.cache`` (not ``multiprocessing``:
    spawning would import the caller's main module, forking would copy a process that torch may
    have given threads). Chunk i goes to process i mod n; a thread per process reads its results,
    so neither side ever blocks on a full pipe."""

    def __init__(self, encoder: _Encoder, n: int):
        root = Path(__file__).resolve().parents[1]  # a source checkout: the workers import mt from it too
        paths = [str(root)] if root.name != "site-packages" else []
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(paths + [p for p in [os.environ.get("PYTHONPATH")] if p])}
        self.procs: list[subprocess.Popen] = []
        self.results = [queue.Queue() for _ in range(n)]
        try:
            for out in self.results:
                proc = subprocess.Popen([sys.executable, "-m", "mt.cache"], stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, env=env)
                self.procs.append(proc)
                self._send(len(self.procs) - 1, encoder)
                threading.Thread(target=self._read, args=(proc, out), daemon=True).start()
        except BaseException:
            self.close()
            raise

    @staticmethod
    def _read(proc: subprocess.Popen, out: queue.Queue) -> None:
        while True:
            try:
                out.put(_receive(proc.stdout))
            except BaseException as e:  # EOF (the process ended), a broken pipe, an unpicklable result
                out.put(("died", None if isinstance(e, EOFError) else e))
                return

    def _send(self, k: int, obj: object) -> None:
        try:
            _send(self.procs[k].stdin, obj)
        except OSError:  # it has ended
            try:
                status = self.procs[k].wait(timeout=10)
            except subprocess.TimeoutExpired:
                status = "unknown"
            raise CacheError(f"a tokenizing process ended with status {status}") from None

    def map(self, chunks: Iterator[tuple[list[str], list[str]]]) -> Iterator[dict]:
        """Encoded chunks in order, at most two per process in flight (reading never runs ahead)."""
        n, pending = len(self.procs), deque()
        for i, chunk in enumerate(chunks):
            if len(pending) >= 2 * n:
                yield self._result(pending.popleft())
            self._send(i % n, chunk)
            pending.append(i % n)
        while pending:
            yield self._result(pending.popleft())

    def _result(self, k: int) -> dict:
        status, value = self.results[k].get()
        if status == "error":
            raise value
        if status == "died":
            why = f" ({type(value).__name__}: {value})" if value is not None else ""
            raise CacheError(f"a tokenizing process ended with status {self.procs[k].wait()}{why}")
        return value

    def close(self) -> None:
        for proc in self.procs:
            with contextlib.suppress(OSError):
                proc.stdin.close()
        for proc in self.procs:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _encoded(chunks: Iterator[tuple[list[str], list[str]]], encoder: _Encoder, num_proc: int) -> Iterator[dict]:
    """Encoded chunks in order: here for a corpus of one chunk (or ``num_proc`` 1), else by
    ``num_proc`` processes."""
    first = next(chunks, None)
    if first is None:
        return
    second = next(chunks, None)
    if second is None or num_proc <= 1:
        for chunk in itertools.chain([first], [second] if second is not None else [], chunks):
            yield encoder(chunk)
        return
    workers = _Workers(encoder, num_proc)
    try:
        yield from workers.map(itertools.chain([first, second], chunks))
    finally:
        workers.close()


# --------------------------------------------------------------------------------------------------
# Building


def id_dtype(vocab_size: int) -> np.dtype:
    """The narrowest unsigned type that holds every id."""
    return np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.uint32)


def _here() -> str:
    """This host and pid namespace, as 12 hex digits: a pid in a temporary name means something only there."""
    return hashlib.sha256(f"{socket.gethostname()}\0{pid_namespace()}".encode()).hexdigest()[:12]


def _temp_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{_here()}-{os.getpid()}-{uuid.uuid4().hex[:8]}")


def _sweep_killed_builds(path: Path) -> None:
    """Remove this cache's temporary directories left by killed builds of this host and pid namespace
    (their pid is gone); builds elsewhere, or of a live process, are never touched."""
    pattern = re.compile(re.escape(f".{path.name}.tmp-{_here()}-") + r"(\d+)-[0-9a-f]{8}")
    for temp in path.parent.glob(f".{path.name}.tmp-*"):
        match = pattern.fullmatch(temp.name)
        if match and not _alive(int(match.group(1))):
            shutil.rmtree(temp, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def build(chunks: Iterable[tuple[list[str], list[str]]], path: str | Path, src_tok: Tokenizer, tgt_tok: Tokenizer,
          *, num_proc: int = 1, dedup: bool = False, source: str = "",
          progress: Callable[[int], None] | None = None) -> Path:
    """Tokenize chunks of (sources, targets) into the cache at ``path``. Written under a temporary
    name and renamed when complete; if another process completed the same cache first, that one is
    kept. ``progress`` is called with the pairs of each chunk written."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _sweep_killed_builds(path)
    temp = _temp_name(path)
    temp.mkdir()
    dtype = id_dtype(max(src_tok.vocab_size, tgt_tok.vocab_size))
    encoder = _Encoder(src_tok, tgt_tok, dtype, dedup)
    pairs, tokens, hashes = 0, {side: 0 for side in SIDES}, []
    try:
        files = {name: open(temp / name, "wb") for name in ("src.ids", "tgt.ids", "src.idx", "tgt.idx", "flags")}
        with files["src.ids"], files["tgt.ids"], files["src.idx"], files["tgt.idx"], files["flags"]:
            for side in SIDES:
                files[f"{side}.idx"].write(np.zeros(1, dtype=np.int64).tobytes())
            for out in _encoded(iter(chunks), encoder, num_proc):
                for side in SIDES:
                    files[f"{side}.ids"].write(out[f"{side}_ids"].tobytes())
                    offsets = tokens[side] + np.cumsum(out[f"{side}_len"])
                    files[f"{side}.idx"].write(offsets.astype(np.int64).tobytes())
                    tokens[side] = int(offsets[-1])
                files["flags"].write(out["flags"].tobytes())
                if dedup:
                    hashes.append(out["hash"])
                pairs += len(out["flags"])
                if progress is not None:
                    progress(len(out["flags"]))
            for f in files.values():
                f.flush()
                os.fsync(f.fileno())
        duplicates = _mark_duplicates(temp / "flags", np.concatenate(hashes)) if dedup and hashes else 0
        del hashes
        meta = {"format": "mt-tokenized", "version": VERSION, "pairs": pairs, "dtype": dtype.name,
                "tokens": tokens, "vocab": {"src": src_tok.vocab_size, "tgt": tgt_tok.vocab_size},
                "tokenizer": {"src": src_tok.fingerprint, "tgt": tgt_tok.fingerprint}, "dedup": dedup,
                "duplicates": duplicates, "source": source}
        with open(temp / "meta.json", "w", encoding="utf-8") as f:
            json.dump(meta, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        fsync_dir(temp)
        try:
            os.rename(temp, path)
        except OSError:
            if not (path / "meta.json").exists():
                raise
            shutil.rmtree(temp)  # another process finished the same cache first
        fsync_dir(path.parent)
    except BaseException:
        shutil.rmtree(temp, ignore_errors=True)
        raise
    return path


def _mark_duplicates(flags_path: Path, hashes: np.ndarray) -> int:
    """Set ``DUPLICATE`` on every pair whose digest an earlier pair has; return how many."""
    order = np.argsort(hashes, kind="stable")  # equal digests: earliest first
    sorted_hashes = hashes[order]
    repeat = np.zeros(len(hashes), dtype=bool)
    repeat[1:] = sorted_hashes[1:] == sorted_hashes[:-1]
    duplicate = order[repeat]
    flags = np.fromfile(flags_path, dtype=np.uint8)
    flags[duplicate] |= DUPLICATE
    with open(flags_path, "r+b") as f:
        f.write(flags.tobytes())
        f.flush()
        os.fsync(f.fileno())
    return int(len(duplicate))


# --------------------------------------------------------------------------------------------------
# Reading


class TokenizedCorpus:
    """A complete cache opened for reading."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            self.meta = json.loads((self.path / "meta.json").read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise CacheError(f"{self.path}: not a complete tokenized cache ({e})") from None
        if self.meta.get("format") != "mt-tokenized" or self.meta.get("version") != VERSION:
            raise CacheError(f"{self.path}: tokenized cache version {self.meta.get('version')}, not {VERSION}")
        self.pairs: int = self.meta["pairs"]
        self.dtype = np.dtype(self.meta["dtype"])
        self._fds: dict[str, int] = {}
        for name in ("src.ids", "tgt.ids", "src.idx", "tgt.idx"):
            self._fds[name] = os.open(self.path / name, os.O_RDONLY)
        for side in SIDES:
            expected = (self.pairs + 1) * 8
            if os.fstat(self._fds[f"{side}.idx"]).st_size != expected:
                raise CacheError(f"{self.path / f'{side}.idx'}: truncated (expected {expected} bytes)")

    def __len__(self) -> int:
        return self.pairs

    def __del__(self) -> None:
        for fd in getattr(self, "_fds", {}).values():
            os.close(fd)

    def __getstate__(self) -> dict:  # file descriptors do not travel between processes; reopen
        return {"path": self.path}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["path"])

    def _read(self, name: str, dtype: np.dtype, start: int, count: int) -> np.ndarray:
        size = np.dtype(dtype).itemsize
        data = os.pread(self._fds[name], count * size, start * size)
        if len(data) != count * size:
            raise CacheError(f"{self.path / name}: truncated")
        return np.frombuffer(data, dtype=dtype)

    def chunks(self, size: int = READ_CHUNK) -> Iterator[tuple[int, np.ndarray, np.ndarray, np.ndarray]]:
        """``(start, src_len, tgt_len, flags)`` for consecutive chunks of pairs: whole columns, read
        ``size`` pairs at a time (so memory stays at a chunk whatever the corpus)."""
        with open(self.path / "flags", "rb") as flags:
            for start in range(0, self.pairs, size):
                count = min(size, self.pairs - start)
                src = np.diff(self._read("src.idx", np.int64, start, count + 1))
                tgt = np.diff(self._read("tgt.idx", np.int64, start, count + 1))
                yield start, src, tgt, np.frombuffer(flags.read(count), dtype=np.uint8)

    def rows(self, side: str, indices: Iterable[int]) -> list[np.ndarray]:
        """The ids of sentences ``indices`` on ``side``."""
        idx, ids = f"{side}.idx", f"{side}.ids"
        out = []
        for i in indices:
            start, end = self._read(idx, np.int64, int(i), 2)
            out.append(self._read(ids, self.dtype, int(start), int(end - start)))
        return out


if __name__ == "__main__":
    _serve()
