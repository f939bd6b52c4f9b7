"""Translation of a stream of lines with a trained run: load, batch, search, detokenize, in order.

``Translator.translate`` reads lines lazily in chunks (so a 1M-line file never sits in memory at
once), sorts each chunk by length into token-budget batches for speed, and yields exactly one output
per input line, in input order. Empty lines give empty outputs without touching the model; lines
longer than the model can hold are truncated with a warning.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from mt import checkpoint as ckpt
from mt.config import Config, ConfigError, DecodeConfig, config_from_dict
from mt.int8 import quantize_int8
from mt.model import Transformer
from mt.search import Hypothesis, beam_search, greedy_search
from mt.data import pad
from mt.device import pick_device, slow_bf16_warning
from mt.tokenizer import EOS_ID, Tokenizer, tokenizer_files
from mt.tune import read_defaults

CHUNK_LINES = 2000  # lines read, sorted and translated together


def load_model(run_dir: str | Path, checkpoint: str | None = None, average: int = 0,
               device: str = "auto") -> tuple[Transformer, Config, Tokenizer, Tokenizer]:
    """Model (eval mode), its config and tokenizers from a run directory alone. ``checkpoint`` None:
    the one chosen on validation after training (RUN/decode.yaml), else best."""
    run_dir = Path(run_dir)
    if average > 1:
        found = ckpt.step_checkpoints(run_dir / "checkpoints")
        if len(found) < average:
            raise ckpt.CheckpointError(f"{run_dir / 'checkpoints'}: --average {average} needs {average} step "
                                       f"checkpoints, found {len(found)}")
        state = ckpt.average([p for _, p in found[-average:]])
    else:
        state = ckpt.load(ckpt.resolve(run_dir, checkpoint or read_defaults(run_dir).get("checkpoint", "best")))
    cfg = config_from_dict(state["config"])
    src_path, tgt_path = tokenizer_files(run_dir, cfg.tokenizer.joint)
    src_tok, tgt_tok = Tokenizer(src_path), Tokenizer(tgt_path)
    if (src_tok.vocab_size, tgt_tok.vocab_size) != (state["vocab"]["src"], state["vocab"]["tgt"]):
        raise ckpt.CheckpointError(f"{src_path}: vocabulary size does not match the checkpoint's")
    model = Transformer(cfg.model, src_tok.vocab_size, tgt_tok.vocab_size, joint=cfg.tokenizer.joint)
    model.load_state_dict(state["model"])
    model.to(pick_device(device)).eval()
    return model, cfg, src_tok, tgt_tok


@dataclass
class Translation:
    hypotheses: list[Hypothesis]  # best first; empty for an empty input line
    texts: list[str]  # detokenized hypotheses


class Translator:
    """Translate lines with a model; decoding options default to the run's ``decode`` section."""

    def __init__(self, model: Transformer, src_tok: Tokenizer, tgt_tok: Tokenizer,
                 decode: DecodeConfig | None = None, *, greedy: bool = False, nbest: int = 1,
                 warn: Callable[[str], None] | None = None, use_cache: bool = True):
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
        self.warn = warn or (lambda message: print(f"mt: warning: {message}", file=sys.stderr))
        self.device = next(model.parameters()).device
        self.max_src = model.cfg.max_positions

    @classmethod
    def from_run(cls, run_dir: str | Path, *, checkpoint: str | None = None, average: int = 0,
                 device: str = "auto", greedy: bool = False, nbest: int = 1, **decode_overrides) -> Translator:
        """Decoding options: ``decode_overrides`` (None: not given), else the run's tuned defaults
        (RUN/decode.yaml: beam, lenpen), else its config's ``decode`` section."""
        model, cfg, src_tok, tgt_tok = load_model(run_dir, checkpoint, average, device)
        tuned = {k: v for k, v in read_defaults(run_dir).items() if k in ("beam", "lenpen")}
        decode = replace(cfg.decode, **tuned)
        decode = replace(decode, **{k: v for k, v in decode_overrides.items() if v is not None})
        if decode_overrides.get("beam") is None and nbest > decode.beam:  # --nbest N alone: a beam of N
            decode = replace(decode, beam=nbest)
        if decode.dtype == "int8" and device == "auto":  # the int8 kernels are CPU kernels
            model.to("cpu")
        translator = cls(model, src_tok, tgt_tok, decode, greedy=greedy, nbest=nbest)
        if decode.dtype == "bf16":
            model.to(torch.bfloat16)
            warning = slow_bf16_warning(translator.device)
            if warning:
                translator.warn(f"{warning} (--dtype fp32)")
        elif decode.dtype == "int8":
            quantize_int8(model)
        return translator

    def _search(self, ids: list[list[int]]) -> list[list[Hypothesis]]:
        src = pad(ids).to(self.device)
        d = self.decode
        if self.greedy:
            return [[h] for h in greedy_search(self.model, src, max_len_a=d.max_len_a, max_len_b=d.max_len_b,
                                               min_len=d.min_len, lenpen=d.lenpen, use_cache=self.use_cache)]
        return beam_search(self.model, src, beam=d.beam, lenpen=d.lenpen, max_len_a=d.max_len_a,
                           max_len_b=d.max_len_b, min_len=d.min_len, nbest=self.nbest, use_cache=self.use_cache)

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
            for k, h in zip(batch, hyps):
                texts = [" ".join(t.split()) for t in self.tgt_tok.decode([x.tokens for x in h])]  # one line each
                results[todo[k]] = Translation(h, texts)
            start = end
        for i, r in enumerate(results):
            if r is None:
                results[i] = Translation([], [""])
        return results

    def translate(self, lines: Iterable[str]) -> Iterator[Translation]:
        """One ``Translation`` per input line, in order; input is consumed in chunks."""
        chunk: list[str] = []
        lineno = 1
        for line in lines:
            chunk.append(line)
            if len(chunk) == CHUNK_LINES:
                yield from self._chunk(chunk, lineno)
                lineno += len(chunk)
                chunk = []
        if chunk:
            yield from self._chunk(chunk, lineno)

    def translate_lines(self, lines: Iterable[str]) -> list[str]:
        """Convenience: the best translation of each line."""
        return [t.texts[0] for t in self.translate(lines)]
