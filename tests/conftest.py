"""Shared fixtures: the repository root, the Multi30k corpus, a tiny SentencePiece model, a cache dir."""

from __future__ import annotations

import atexit
import gzip
import os
import shutil
import tempfile
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
MULTI30K = REPO_ROOT / "data" / "multi30k"
MULTI30K_FILES = [f"{split}.{lang}.gz" for split in ("train", "val", "test_2016_flickr") for lang in ("de", "en")]

# 2 threads unless MT_TEST_THREADS says otherwise (the suite must pass with 1 and 2); subprocesses too
THREADS = int(os.environ.get("MT_TEST_THREADS", "2"))
torch.set_num_threads(THREADS)
os.environ["OMP_NUM_THREADS"] = str(THREADS)
# train.precision and decode.dtype "auto" mean fp32 in the tests (golden values must not depend on the
# CPU); the tests of auto itself remove this (monkeypatch.delenv)
os.environ["MT_AUTO_FP32"] = "1"
# a run without data.cache_dir caches its tokenized corpora under $XDG_CACHE_HOME/mt: not the user's,
# and gone when the suite ends
os.environ["XDG_CACHE_HOME"] = tempfile.mkdtemp(prefix="mt-test-cache-")
atexit.register(shutil.rmtree, os.environ["XDG_CACHE_HOME"], ignore_errors=True)


def head_lines(path: Path, n: int) -> list[str]:
    """The first ``n`` lines of a gzipped text file, newline removed."""
    lines = []
    with gzip.open(path, "rt", encoding="utf-8", newline="\n") as f:
        for line in f:
            if len(lines) == n:
                break
            lines.append(line.rstrip("\n"))
    return lines


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO_ROOT


@pytest.fixture(scope="session")
def multi30k() -> Path:
    """``data/multi30k`` of the repository; the tests that need it fail (not skip) when it is missing."""
    missing = [name for name in MULTI30K_FILES if not (MULTI30K / name).is_file()]
    if missing:
        pytest.fail(f"Multi30k is missing from {MULTI30K} ({', '.join(missing)}): run `make data` first",
                    pytrace=False)
    return MULTI30K


@pytest.fixture(scope="session")
def multi30k_head(multi30k):
    """``multi30k_head(split, lang, n)``: the first n lines of a Multi30k file (memoised)."""
    memo: dict[tuple[str, str, int], list[str]] = {}

    def get(split: str, lang: str, n: int) -> list[str]:
        key = (split, lang, n)
        if key not in memo:
            memo[key] = head_lines(multi30k / f"{split}.{lang}.gz", n)
        return memo[key]

    return get


@pytest.fixture(scope="session")
def small_corpus(multi30k_head):
    """``small_corpus(directory, train, valid)``: the first ``train`` Multi30k de-en train pairs and
    ``valid`` val pairs written into ``directory``; returns the config's ``data`` section for them
    (with a cache inside ``directory``)."""

    def write(directory: Path, train: int, valid: int) -> dict:
        for split, count in (("train", train), ("val", valid)):
            for lang in ("de", "en"):
                lines = multi30k_head(split, lang, count)
                (directory / f"{split}.{lang}").write_text("\n".join(lines) + "\n", encoding="utf-8")
        return {"train": {"src": str(directory / "train.de"), "tgt": str(directory / "train.en")},
                "valid": {"src": str(directory / "val.de"), "tgt": str(directory / "val.en")},
                "cache_dir": str(directory / "cache")}

    return write


@pytest.fixture(scope="session")
def spm_model(tmp_path_factory, multi30k_head) -> Path:
    """A joint unigram SentencePiece model (300 pieces) trained on the first 2000 Multi30k train pairs."""
    from mt.tokenizer import train_sentencepiece

    out = tmp_path_factory.mktemp("spm") / "tiny.model"
    sentences = multi30k_head("train", "de", 2000) + multi30k_head("train", "en", 2000)
    return train_sentencepiece(sentences, out, vocab_size=300, num_threads=1)


@pytest.fixture(scope="session")
def tokenizer(spm_model):
    from mt.tokenizer import Tokenizer

    return Tokenizer(spm_model)


@pytest.fixture
def cache_dir(tmp_path) -> str:
    """A per-test cache directory (``DataConfig.cache_dir``), so ~/.cache stays clean."""
    path = tmp_path / "hf_cache"
    path.mkdir()
    return str(path)
