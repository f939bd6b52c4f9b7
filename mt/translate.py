"""Translation of a stream of lines with a trained run: load, batch, search, detokenize, in order.

``Translator.translate`` reads lines lazily in chunks (so a 1M-line file never sits in memory at
once), sorts each chunk by length into token-budget batches for speed, and yields exactly one output
per input line, in input order. Empty lines give empty outputs without touching the model; lines
longer than the model can hold are truncated with a warning.
"""

from __future__ import annotations

import os
import select
import sys
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

from mt import attention
from mt.batch import pad
from mt.config import ConfigError, DecodeConfig
from mt.evaluate import bleu
from mt.linear import prepack
from mt.model import Transformer
from mt.progress import bar
from mt.run import Run
from mt.search import Hypothesis, beam_search, greedy_search
from mt.tokenizer import EOS_ID, Tokenizer

CHUNK_LINES = 2000  # lines read, sorted and translated together


def _warn(message: str) -> None:
    print(f"mt: warning: {message}", file=sys.stderr)


@dataclass
class Translation:
    hypotheses: list[Hypothesis]  # best first; empty for an empty input line
    texts: list[str]  # detokenized hypotheses
    alignments: list[list[tuple[int, int]]] = field(default_factory=list)  # per hypothesis, with ``align``


class Translator:
    """Translate lines with a model; decoding options default to the run's ``decode`` section."""

    def __init__(self, model: Transformer, src_tok: Tokenizer, tgt_tok: Tokenizer,
                 decode: DecodeConfig | None = None, *, greedy: bool = False, nbest: int = 1,
                 warn: Callable[[str], None] | None = None, use_cache: bool = True, align: bool = False,
                 align_layer: int | None = None):
        """``align``: also give word alignments (``mt.attention.align``), from the cross-attention of
        all decoder layers averaged, or of ``align_layer`` alone (0-based; negative: from the last)."""
        self.model, self.src_tok, self.tgt_tok = model, src_tok, tgt_tok
        self.decode = decode or DecodeConfig()
        self.greedy, self.nbest = greedy, nbest
        self.use_cache = use_cache  # False re-runs the decoder on the whole prefix (for benchmarks)
        if nbest < 1:
            raise ConfigError(f"--nbest must be at least 1, got {nbest}")
        if nbest > 1 and greedy:
            raise ConfigError("--nbest needs beam search (not --greedy)")
        if nbest > self.decode.beam:
            raise ConfigError(f"--nbest {nbest} exceeds --beam {self.decode.beam}")
        layers = model.cfg.decoder_layers
        if align_layer is not None and not -layers <= align_layer < layers:
            raise ConfigError(f"--align-layer {align_layer + 1 if align_layer >= 0 else align_layer}: the model "
                              f"has {layers} decoder layers (1..{layers})")
        self.align, self.align_layer = align, align_layer
        self.warn = warn or _warn
        self.device = next(model.parameters()).device
        self.max_src = model.cfg.max_positions

    @classmethod
    def from_run(cls, run_dir: str | Path, *, checkpoint: str | None = None, average: int = 0,
                 device: str = "auto", greedy: bool = False, nbest: int = 1, align: bool = False,
                 align_layer: int | None = None, **decode_overrides) -> Translator:
        """Decoding options: ``decode_overrides`` (None: not given), else the run's tuned defaults
        (RUN/decode.yaml: beam, lenpen), else its config's ``decode`` section."""
        run = Run(run_dir)
        tuned = {k: v for k, v in run.read_defaults().items() if k in ("beam", "lenpen")}
        loaded = run.load_for_inference(checkpoint, decode_overrides.get("dtype"), device, average, warn=_warn)
        prepack(loaded.model)  # its own model: weights reordered once where oneDNN computes (bf16; fp32 on some CPUs)
        decode = replace(loaded.config.decode, **tuned)
        decode = replace(decode, **{k: v for k, v in decode_overrides.items() if v is not None})
        if decode_overrides.get("beam") is None and nbest > decode.beam:  # --nbest N alone: a beam of N
            decode = replace(decode, beam=nbest)
        return cls(loaded.model, loaded.src_tok, loaded.tgt_tok, decode, greedy=greedy, nbest=nbest, align=align,
                   align_layer=align_layer)

    def _search(self, ids: list[list[int]]) -> list[list[Hypothesis]]:
        src = pad(ids).to(self.device)
        d = self.decode
        if self.greedy:
            return [[h] for h in greedy_search(self.model, src, max_len_a=d.max_len_a, max_len_b=d.max_len_b,
                                               min_len=d.min_len, lenpen=d.lenpen, use_cache=self.use_cache)]
        return beam_search(self.model, src, beam=d.beam, lenpen=d.lenpen, max_len_a=d.max_len_a,
                           max_len_b=d.max_len_b, min_len=d.min_len, nbest=self.nbest, use_cache=self.use_cache)

    def _align(self, src_ids: list[list[int]], hyps: list[list[Hypothesis]]) -> list[list[list[tuple[int, int]]]]:
        """Word links of every hypothesis of every sentence, from one teacher-forced pass."""
        pairs = [(s, h.tokens + [EOS_ID]) for s, nbest in zip(src_ids, hyps) for h in nbest]
        flat = attention.align(self.model, self.src_tok, self.tgt_tok, [p[0] for p in pairs], [p[1] for p in pairs],
                               self.align_layer)
        out, start = [], 0
        for nbest in hyps:
            out.append(flat[start: start + len(nbest)])
            start += len(nbest)
        return out

    def _chunk(self, lines: list[str], first_lineno: int) -> list[Translation]:
        results: list[Translation | None] = [None] * len(lines)
        texts = [line.strip() for line in lines]
        todo = [i for i, t in enumerate(texts) if t]
        encoded = self.src_tok.encode([texts[i] for i in todo]) if todo else []
        for k, ids in enumerate(encoded):
            if len(ids) > self.max_src:
                self.warn(f"line {first_lineno + todo[k]}: {len(ids)} tokens, truncated to {self.max_src}")
                encoded[k] = ids[: self.max_src - 1] + [EOS_ID]
        order = sorted(range(len(todo)), key=lambda k: len(encoded[k]))
        budget = self.decode.batch_tokens
        start = 0
        while start < len(order):
            end, longest = start, 0
            while end < len(order):
                longest = max(longest, len(encoded[order[end]]))
                if (end + 1 - start) * longest > budget and end > start:
                    break
                end += 1
            batch = order[start:end]
            hyps = self._search([encoded[k] for k in batch])
            links = self._align([encoded[k] for k in batch], hyps) if self.align else None
            for n, (k, h) in enumerate(zip(batch, hyps)):
                texts = [" ".join(t.split()) for t in self.tgt_tok.decode([x.tokens for x in h])]  # one line each
                results[todo[k]] = Translation(h, texts, links[n] if links else [])
            start = end
        for i, r in enumerate(results):
            if r is None:
                results[i] = Translation([], [""])
        return results

    def translate(self, lines: Iterable[str], ready: Callable[[], bool] | None = None) -> Iterator[Translation]:
        """One ``Translation`` per input line, in order; input is consumed in chunks of CHUNK_LINES,
        or, with ``ready`` (is another line available without waiting?), of the lines that have
        arrived when the input pauses: a line sent to a waiting filter is answered at once."""
        chunk: list[str] = []
        lineno = 1
        for line in lines:
            chunk.append(line)
            if len(chunk) == CHUNK_LINES or (ready is not None and not ready()):
                yield from self._chunk(chunk, lineno)
                lineno += len(chunk)
                chunk = []
        if chunk:
            yield from self._chunk(chunk, lineno)

    def translate_lines(self, lines: Iterable[str]) -> list[str]:
        """Convenience: the best translation of each line."""
        return [t.texts[0] for t in self.translate(lines)]


class LineStream:
    """The lines of a file descriptor (``\n`` kept, split on ``\n`` only) as they arrive, read in
    blocks; ``ready()`` says whether the next line can be had without waiting for the writer."""

    BLOCK = 1 << 16

    def __init__(self, fd: int):
        self.fd = fd
        self._buffer = bytearray()
        self._eof = False

    def ready(self) -> bool:
        if b"\n" in self._buffer or self._eof:
            return True
        try:
            return bool(select.select([self.fd], [], [], 0)[0])
        except (OSError, ValueError):  # not selectable: a plain file, always ready
            return True

    def __iter__(self) -> Iterator[bytes]:
        while True:
            end = self._buffer.find(b"\n")
            if end >= 0:
                line = bytes(self._buffer[: end + 1])
                del self._buffer[: end + 1]
                yield line
                continue
            if self._eof:
                if self._buffer:
                    yield bytes(self._buffer)
                    self._buffer.clear()
                return
            block = os.read(self.fd, self.BLOCK)
            if block:
                self._buffer += block
            else:
                self._eof = True


def validation_bleu(model: Transformer, src: list[str], ref: list[str], src_tok: Tokenizer, tgt_tok: Tokenizer,
                    decode: DecodeConfig, tgt_lang: str = "", progress: bool | None = False) -> float:
    """Corpus BLEU (sacreBLEU defaults, the tokenizer for ``tgt_lang``) of translating ``src`` with
    greedy (beam 1) or beam search, against ``ref``; the model keeps its dtype and its training mode."""
    was_training = model.training
    model.eval()
    translator = Translator(model, src_tok, tgt_tok, decode, greedy=decode.beam == 1)
    with bar(progress, total=len(src), desc="validation BLEU", unit=" lines", leave=False) as shown:
        hypotheses = []
        for result in translator.translate(src):
            hypotheses.append(result.texts[0])
            shown.update(1)
    model.train(was_training)
    return bleu(tgt_lang, force=True).corpus_score(hypotheses, [ref]).score  # force: no tokenized-input warning
