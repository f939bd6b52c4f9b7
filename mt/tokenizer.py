"""SentencePiece subword models (Kudo & Richardson, 2018): training and a thin encode/decode wrapper.

Special ids follow fairseq and Hugging Face M2M100, so a model exports without remapping:
``<s>`` = 0, ``<pad>`` = 1, ``</s>`` = 2, ``<unk>`` = 3. A sentence is encoded as its pieces followed
by ``</s>``; the decoder's input starts with ``<s>``.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import sentencepiece as spm

from mt.errors import MtError
from mt.files import atomic_write

BOS_ID, PAD_ID, EOS_ID, UNK_ID = 0, 1, 2, 3
WORD_START = "\u2581"  # SentencePiece's ▁: the piece begins a word
SPECIAL_PIECES = {"bos": "<s>", "pad": "<pad>", "eos": "</s>", "unk": "<unk>"}


class TokenizerError(MtError):
    """SentencePiece could not be trained or loaded; the message says why and what to change."""


def sample_sentences(sentences: Iterable[str], size: int, seed: int = 1) -> tuple[list[str], int]:
    """A uniform sample of ``size`` non-empty sentences from a stream of any length (reservoir
    sampling, Vitter's algorithm R, with draws from numpy seeded by ``seed``), and how many non-empty
    sentences the stream held. The same stream and seed give the same sample; order is kept when the
    stream is no longer than ``size``."""
    rng = np.random.default_rng(seed)
    reservoir: list[str] = []
    seen, pending = 0, []

    def replace_some() -> None:
        nonlocal seen
        slots = rng.integers(0, np.arange(seen + 1, seen + len(pending) + 1))  # item j replaces slot < size
        for j in np.flatnonzero(slots < size):
            reservoir[slots[j]] = pending[j]
        seen += len(pending)
        pending.clear()

    for sentence in sentences:
        if not sentence:
            continue
        if len(reservoir) < size:
            reservoir.append(sentence)
            seen += 1
        else:
            pending.append(sentence)
            if len(pending) == 1 << 16:
                replace_some()
    if pending:
        replace_some()
    return reservoir, seen


def train_sentencepiece(
    sentences: Iterable[str],
    out_path: str | Path,
    *,
    vocab_size: int,
    model_type: str = "unigram",
    character_coverage: float = 1.0,
    input_sentence_size: int = 0,
    num_threads: int = 0,
    seed: int = 1,
) -> Path:
    """Train a SentencePiece model on ``sentences`` and write it to ``out_path`` (atomically).

    With ``input_sentence_size`` > 0, training sees a seeded uniform sample of that many sentences
    (``sample_sentences``): memory stays bounded on big corpora, and the same corpus and seed give
    the same model. ``num_threads`` 0: one per core.
    """
    out_path = Path(out_path)
    buffer = io.BytesIO()
    if input_sentence_size:
        sample, total = sample_sentences(sentences, input_sentence_size, seed)
    else:
        sample = [s for s in sentences if s]
        total = len(sample)
    count = len(sample)
    spm.set_random_generator_seed(seed)

    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(sample),
            model_writer=buffer,
            vocab_size=vocab_size,
            model_type=model_type,
            character_coverage=character_coverage,
            input_sentence_size=0,
            shuffle_input_sentence=False,
            bos_id=BOS_ID, pad_id=PAD_ID, eos_id=EOS_ID, unk_id=UNK_ID,
            bos_piece=SPECIAL_PIECES["bos"], pad_piece=SPECIAL_PIECES["pad"],
            eos_piece=SPECIAL_PIECES["eos"], unk_piece=SPECIAL_PIECES["unk"],
            num_threads=num_threads or cores(),
            minloglevel=2,
        )
    except RuntimeError as e:
        message = str(e)
        limit = re.search(r"value <= (\d+)", message)
        if limit:
            raise TokenizerError(
                f"tokenizer.vocab_size={vocab_size} is more than SentencePiece can build from this corpus "
                f"({count} sentences of {total}): set tokenizer.vocab_size <= {limit.group(1)}") from None
        raise TokenizerError(f"SentencePiece training failed: {message.splitlines()[-1]}") from None
    if count == 0:
        raise TokenizerError("SentencePiece training failed: no non-empty sentences")
    del sample
    with atomic_write(out_path, "wb") as f:
        f.write(buffer.getvalue())
    return out_path


def cores() -> int:
    """The cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


class Tokenizer:
    """Encode text to ids (pieces + ``</s>``) and decode ids to text. Picklable (for ``num_proc``)."""

    def __init__(self, model: str | Path | bytes):
        if isinstance(model, (str, Path)):
            try:
                model = Path(model).read_bytes()
            except OSError as e:
                raise TokenizerError(f"{model}: cannot read SentencePiece model ({e.strerror})") from None
        self._proto = bytes(model)
        self._scores: np.ndarray | None = None  # each piece's log-probability, for sampling
        self._load()

    def _load(self) -> None:
        self.sp = spm.SentencePieceProcessor()
        try:
            self.sp.LoadFromSerializedProto(self._proto)
        except RuntimeError:
            raise TokenizerError("not a valid SentencePiece model") from None
        for name, want in (("bos", BOS_ID), ("pad", PAD_ID), ("eos", EOS_ID), ("unk", UNK_ID)):
            got = getattr(self.sp, f"{name}_id")()
            if got != want:
                raise TokenizerError(f"SentencePiece model has {name}_id={got}; mt needs {want} "
                                     f"(train it with `mt tokenizer train`)")

    def __getstate__(self) -> dict:
        return {"proto": self._proto}

    def __setstate__(self, state: dict) -> None:
        self._proto, self._scores = state["proto"], None
        self._load()

    @property
    def vocab_size(self) -> int:
        return self.sp.get_piece_size()

    @property
    def fingerprint(self) -> str:
        """A digest of the model, used to key cached tokenized datasets."""
        return hashlib.sha256(self._proto).hexdigest()[:16]

    def encode(self, texts: list[str]) -> list[list[int]]:
        """Each text to its piece ids followed by ``</s>``."""
        return [ids + [EOS_ID] for ids in self.sp.encode(texts, out_type=int)]

    def decode(self, ids: list[list[int]]) -> list[str]:
        """Ids to text; special tokens (``<s>``, ``</s>``, ``<pad>``) are dropped."""
        return self.sp.decode([[i for i in seq if i >= UNK_ID] for seq in ids])

    def sample(self, rows: Sequence[Sequence[int]], *, alpha: float, nbest: int, seed: int,
               limit: int) -> list[Sequence[int]]:
        """Subword regularisation (Kudo, 2018, l-best sampling): each row of ids (pieces + ``</s>``)
        segmented anew, as one of the ``nbest`` best segmentations of its text drawn with probability
        proportional to P(segmentation)^``alpha`` under the unigram model. The text is the same, only
        its pieces change. Rows holding ``<unk>`` (their text would not come back) and draws of more
        than ``limit`` ids keep their ids. The draws come from numpy seeded by ``seed``: the same rows
        and seed give the same result in any process (SentencePiece's own sampling does not: its draws
        differ from process to process whatever seed it is given)."""
        if self._scores is None:
            self._scores = np.array([self.sp.get_score(i) for i in range(self.vocab_size)])
        out = list(rows)
        todo = [i for i, row in enumerate(rows) if UNK_ID not in row and len(row) > 1]
        if not todo:
            return out
        texts = self.sp.decode([[int(x) for x in rows[i][:-1]] for i in todo])  # without </s>
        lists = self.sp.nbest_encode(texts, out_type=int, nbest_size=nbest)  # each: up to nbest segmentations
        lists = [[c for c in candidates if c] for candidates in lists]  # (a text that comes back empty: none)
        flat = [c for candidates in lists for c in candidates]
        if not flat:
            return out
        counts = np.array([len(candidates) for candidates in lists])
        sizes = np.array([len(c) for c in flat])
        logp = np.add.reduceat(self._scores[np.concatenate(flat)], np.cumsum(sizes) - sizes)  # (candidates,)
        # one draw per sentence with P ∝ exp(alpha·logp): the Gumbel-max trick, vectorised
        keys = alpha * logp + np.random.default_rng(seed).gumbel(size=len(flat))
        starts = np.cumsum(counts) - counts
        for i, start, n in zip(todo, starts, counts):
            if n:
                pick = flat[start + int(np.argmax(keys[start: start + n]))]
                if len(pick) < limit:
                    out[i] = pick + [EOS_ID]
        return out

    @property
    def can_sample(self) -> bool:
        """Whether ``sample`` works with this model: n-best segmentation needs a unigram model."""
        try:
            self.sp.nbest_encode_as_ids("a", 2)
        except RuntimeError:
            return False
        return True

    def pieces(self, ids: list[int]) -> list[str]:
        """The piece of each id (``▁`` marks a word's start; ``</s>`` and the other specials by name)."""
        return [self.sp.id_to_piece(i) for i in ids]

    def save(self, path: str | Path) -> None:
        with atomic_write(path, "wb") as f:
            f.write(self._proto)
