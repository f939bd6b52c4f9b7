"""The Multi30k corpus (Elliott et al., 2016; task 1, raw captions): the project's reference data.

``fetch`` copies the gzipped files from a local directory (``MULTI30K_DIR``) when one is given and
otherwise downloads them from the official repository, then checks every file's line count.
"""

from __future__ import annotations

import gzip
import os
import zlib
import shutil
import urllib.request
from pathlib import Path

URL = "https://github.com/multi30k/dataset/raw/master/data/task1/raw/{name}"
SPLITS = {"train": 29_000, "val": 1_014, "test_2016_flickr": 1_000}
LANGS = ("de", "en", "fr", "cs")


class DataFetchError(RuntimeError):
    pass


def _count_lines(path: Path) -> int:
    """Lines of a gzipped file; -1 when it is not a complete gzip file."""
    try:
        with gzip.open(path, "rb") as f:
            return sum(1 for _ in f)
    except (OSError, EOFError, zlib.error):
        return -1


def fetch(dest: str | Path, source: str | Path | None = None, langs: tuple[str, ...] = LANGS,
          log=print) -> Path:
    """Put ``{split}.{lang}.gz`` for every split into ``dest``; skip files already there and complete."""
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    source = Path(source) if source else None
    if source is not None and not source.is_dir():
        raise DataFetchError(f"{source}: not a directory (MULTI30K_DIR)")
    for split, expected in SPLITS.items():
        for lang in langs:
            name = f"{split}.{lang}.gz"
            target = dest / name
            if target.exists() and _count_lines(target) == expected:
                continue
            tmp = target.with_name(name + ".part")
            if source is not None:
                if not (source / name).exists():
                    raise DataFetchError(f"{source / name}: missing")
                shutil.copyfile(source / name, tmp)
            else:
                url = URL.format(name=name)
                try:
                    with urllib.request.urlopen(url, timeout=60) as response, open(tmp, "wb") as out:
                        shutil.copyfileobj(response, out)
                except OSError as e:
                    tmp.unlink(missing_ok=True)
                    raise DataFetchError(f"{url}: download failed ({e}); set MULTI30K_DIR to a local copy") from None
            got = _count_lines(tmp)
            if got != expected:
                tmp.unlink()
                what = "not a complete gzip file" if got < 0 else f"{got} lines, expected {expected}"
                raise DataFetchError(f"{source / name if source else URL.format(name=name)}: {what}")
            os.replace(tmp, target)
            log(f"{target} ({expected} lines, from {source or 'the official repository'})")
    return dest
