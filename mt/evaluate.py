"""Corpus-level metrics with sacreBLEU (Post, 2018): BLEU, chrF and TER with their signatures.

Files are read the way the ``sacrebleu`` command line reads them (split on ``\\n``, trailing
whitespace stripped) and scores are formatted with sacreBLEU's own ``format``, so ``mt eval`` prints
the same numbers as ``sacrebleu -f text`` to every digit.
"""

from __future__ import annotations

import gzip

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from sacrebleu.metrics import BLEU, CHRF, TER

from mt.errors import MtError

METRICS = {"bleu": BLEU, "chrf": CHRF, "ter": TER}


class EvaluationError(MtError):
    """Inputs cannot be scored (unknown metric, line counts differ); the message says which."""


@dataclass
class Score:
    name: str  # BLEU, chrF2, TER
    score: float
    signature: str
    text: str  # sacreBLEU's one-line report, e.g. "BLEU|nrefs:1|...|version:2.6.0 = 37.2 66.4/..."

    def as_dict(self) -> dict:
        return {"name": self.name, "score": self.score, "signature": self.signature, "text": self.text}


def parse_metrics(spec: str) -> list[str]:
    names = [m.strip().lower() for m in spec.split(",") if m.strip()]
    for name in names:
        if name not in METRICS:
            raise EvaluationError(f"unknown metric {name!r}; choose from {', '.join(METRICS)}")
    if not names:
        raise EvaluationError(f"no metric given; choose from {', '.join(METRICS)}")
    return names


def read_text(path: str | Path) -> list[str]:
    """Lines of a UTF-8 file (``.gz`` allowed) as sacreBLEU reads them: split on ``\\n``, rstripped."""
    path = Path(path)
    try:
        data = gzip.open(path).read() if path.suffix == ".gz" else path.read_bytes()
    except (OSError, EOFError) as e:
        raise EvaluationError(f"{path}: cannot read ({getattr(e, 'strerror', None) or e})") from None
    return decode_lines(data.split(b"\n"), str(path))


def decode_lines(raw: list[bytes], name: str) -> list[str]:
    if raw and raw[-1] == b"":
        raw = raw[:-1]
    lines = []
    for lineno, line in enumerate(raw, start=1):
        try:
            lines.append(line.decode("utf-8").rstrip())
        except UnicodeDecodeError as e:
            raise EvaluationError(f"{name}:{lineno}: invalid UTF-8 at byte {e.start}") from None
    return lines


def score(hypotheses: list[str], references: list[str], metrics: Iterable[str] = ("bleu", "chrf", "ter"),
          width: int = 1) -> list[Score]:
    """Corpus scores of ``hypotheses`` against one reference per line."""
    if len(hypotheses) != len(references):
        raise EvaluationError(f"{len(hypotheses)} hypotheses but {len(references)} references")
    if not references:
        raise EvaluationError("nothing to score: no lines")
    if width < 0:
        raise EvaluationError(f"width must be >= 0, got {width}")
    results = []
    for name in metrics:
        metric = METRICS[name]()
        result = metric.corpus_score(hypotheses, [references])
        signature = metric.get_signature().format()
        results.append(Score(name=result.name, score=result.score, signature=signature,
                             text=result.format(width=width, signature=signature)))
    return results
