"""Writing a file so that readers see the old content or the complete new one, never a part.

``atomic_write`` writes a temporary file in the target's directory (so the rename cannot cross file
systems), flushes and fsyncs it, renames it over the target and fsyncs the directory, so that the
rename itself survives a power cut. On an error or an interruption the temporary file is removed and
the target is untouched. Every writer in ``mt`` goes through it; the metrics log, which only ever
appends whole lines, is the one exception.
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

def fsync_dir(directory: Path) -> None:
    """Make a rename or an unlink in ``directory`` durable (no-op where directories cannot be opened)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover - some file systems refuse fsync on directories
        pass
    finally:
        os.close(fd)


@contextmanager
def atomic_write(path: str | Path, mode: str = "w") -> Iterator[IO]:
    """``with atomic_write(path) as f: f.write(...)``: ``path`` appears complete when the block ends
    without an error, and is left as it was otherwise. ``mode`` is "w" (UTF-8 text, ``\\n`` line
    ends) or "wb"."""
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_write: mode must be 'w' or 'wb', not {mode!r}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}.{uuid.uuid4().hex[:12]}")  # unique even if a pid is reused
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # the umask applies, as for open()
    try:
        with (os.fdopen(fd, "wb") if mode == "wb" else os.fdopen(fd, "w", encoding="utf-8", newline="\n")) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def atomic_copy(src: str | Path, dst: str | Path) -> None:
    """Copy ``src`` to ``dst`` through ``atomic_write``."""
    with open(src, "rb") as source, atomic_write(dst, "wb") as target:
        shutil.copyfileobj(source, target, 1 << 20)


def pid_namespace() -> str:
    """This process's pid namespace ('' where unknown): two containers may share a host name, and a
    pid means something only within one namespace."""
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return ""
