"""The Multi30k corpus (Elliott et al., 2016; task 1, raw captions): the project's reference data.

``fetch`` copies the gzipped files from a local directory (``MULTI30K_DIR``) when one is given and
otherwise downloads them from the official repository, then checks every file's line count.
"""

from __future__ import annotations

import gzip
import io
import urllib.request
import zlib
from pathlib import Path

from mt.errors import MtError
from mt.files import atomic_write

URL = "https://github.com/multi30k/dataset/raw/master/data/task1/raw/{name}"
SPLITS = {"train": 29_000, "val": 1_014, "test_2016_flickr": 1_000}
LANGS = ("de", "en", "fr", "cs")


class DataFetchError(MtError):
    """A Multi30k file could not be copied or downloaded, or is incomplete."""


def _count_lines(data: bytes) -> int:
    """Lines of gzipped ``data``; -1 when it is not a complete gzip file."""
    try:
        with gzip.open(io.BytesIO(data), "rb") as f:
            return sum(1 for _ in f)
    except (OSError, EOFError, zlib.error):
        return -1


def fetch(dest: str | Path, source: str | Path | None = None, langs: tuple[str, ...] = LANGS,
          log=print) -> Path:
    """Put ``{split}.{lang}.gz`` for every split into ``dest``; skip files already there and complete.
    A file is written only once its line count is right (the files are ~1 MB each)."""
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    source = Path(source) if source else None
    if source is not None and not source.is_dir():
        raise DataFetchError(f"{source}: not a directory (MULTI30K_DIR)")
    for split, expected in SPLITS.items():
        for lang in langs:
            name = f"{split}.{lang}.gz"
            target = dest / name
            if target.exists() and _count_lines(target.read_bytes()) == expected:
                continue
            if source is not None:
                if not (source / name).exists():
                    raise DataFetchError(f"{source / name}: missing")
                data = (source / name).read_bytes()
            else:
                url = URL.format(name=name)
                try:
                    with urllib.request.urlopen(url, timeout=60) as response:
                        data = response.read()
                except OSError as e:
                    raise DataFetchError(f"{url}: download failed ({e}); set MULTI30K_DIR to a local copy") from None
            got = _count_lines(data)
            if got != expected:
                what = "not a complete gzip file" if got < 0 else f"{got} lines, expected {expected}"
                raise DataFetchError(f"{source / name if source else URL.format(name=name)}: {what}")
            with atomic_write(target, "wb") as f:
                f.write(data)
            log(f"{target} ({expected} lines, from {source or 'the official repository'})")
    return dest
