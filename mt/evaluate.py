"""Corpus-level metrics with sacreBLEU (Post, 2018): BLEU, chrF and TER with their signatures.

Files are read the way the ``sacrebleu`` command line reads them (split on ``\\n``, trailing
whitespace stripped) and scores are formatted with sacreBLEU's own ``format`` and tables, so ``mt eval``
prints the same numbers as ``sacrebleu -f text`` to every digit: with several references, BLEU's
tokenizer chosen by the target language (``-l``), and several systems compared by paired bootstrap
resampling (``--paired-bs``).
"""

from __future__ import annotations

import gzip
import io
import json
from argparse import Namespace
from collections import defaultdict
from collections.abc import Iterable, Sequence
from contextlib import redirect_stdout
from dataclasses import dataclass
from pathlib import Path

from sacrebleu.metrics import BLEU, CHRF, TER
from sacrebleu.significance import PairedTest
from sacrebleu.utils import Color, print_results_table

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


def bleu(tgt_lang: str = "", references: Sequence[Sequence[str]] | None = None, **kwargs) -> BLEU:
    """sacreBLEU's BLEU with the tokenizer it picks for the target language (zh, ja-mecab, ko-mecab;
    13a for the others), as ``sacrebleu -l SRC-TGT`` does."""
    try:
        return BLEU(trg_lang=tgt_lang or "", references=references, **kwargs)
    except (ImportError, RuntimeError) as e:  # MeCab and its dictionaries are optional extras
        hint = f"pip install 'sacrebleu[{tgt_lang}]'" if tgt_lang in ("ja", "ko") else " ".join(str(e).split())
        raise EvaluationError(f"BLEU for a {tgt_lang!r} target needs its tokenizer: {hint}") from None


def make_metric(name: str, tgt_lang: str = "", references: Sequence[Sequence[str]] | None = None):
    """The metric ``name`` (bleu, chrf, ter) with the sacrebleu command line's defaults."""
    return bleu(tgt_lang, references) if name == "bleu" else METRICS[name](references=references)


def _check(systems: Sequence[Sequence[str]], references: Sequence[Sequence[str]], width: int) -> None:
    if references and isinstance(references[0], str):
        raise TypeError("references: a list of reference sets (one list of lines each), not of lines")
    if not references:
        raise EvaluationError("no reference given")
    for refs in references:
        if len(refs) != len(references[0]):
            raise EvaluationError(f"the references differ in length: {len(references[0])} and {len(refs)} lines")
    for hypotheses in systems:
        if len(hypotheses) != len(references[0]):
            raise EvaluationError(f"{len(hypotheses)} hypotheses but {len(references[0])} references")
    if not references[0]:
        raise EvaluationError("nothing to score: no lines")
    if width < 0:
        raise EvaluationError(f"width must be >= 0, got {width}")


def score(hypotheses: list[str], references: Sequence[Sequence[str]], metrics: Iterable[str] = ("bleu", "chrf", "ter"),
          width: int = 1, tgt_lang: str = "") -> list[Score]:
    """Corpus scores of ``hypotheses`` against one or more reference sets (each a line per
    hypothesis); BLEU tokenizes as the target language ``tgt_lang`` needs."""
    _check([hypotheses], references, width)
    results = []
    for name in metrics:
        metric = make_metric(name, tgt_lang)
        result = metric.corpus_score(hypotheses, [list(r) for r in references])
        signature = metric.get_signature().format()
        results.append(Score(name=result.name, score=result.score, signature=signature,
                             text=result.format(width=width, signature=signature)))
    return results


def compare(systems: Sequence[tuple[str, list[str]]], references: Sequence[Sequence[str]], metrics: Iterable[str],
            *, paired_bs: bool = False, samples: int = 1000, width: int = 1, tgt_lang: str = "",
            as_json: bool = False) -> str:
    """Several systems side by side, the first the baseline: the table ``sacrebleu REF... -i SYS...``
    prints (with ``paired_bs``, ``--paired-bs``: each system against the baseline by paired bootstrap
    resampling, ``samples`` resamples, sacreBLEU's seed), without colours."""
    _check([lines for _, lines in systems], references, width)
    if len(systems) < 2:
        raise EvaluationError("comparing systems needs at least two (-s BASELINE -s SYSTEM ...)")
    refs = [list(r) for r in references]
    names = [name.upper() for name in metrics]
    built = {name.upper(): make_metric(name, tgt_lang, refs) for name in metrics}
    metric_objects = {name: built[name] for name in (names if paired_bs else sorted(names))}  # as sacrebleu orders them
    if paired_bs:
        named = [(f"Baseline: {systems[0][0]}", systems[0][1]), *systems[1:]]
        signatures, scores = PairedTest(named, metric_objects, references=None, test_type="bs", n_samples=samples)()
        signatures = {k: v.format() for k, v in signatures.items()}
    else:
        signatures, scores = {}, defaultdict(list)
        scores["System"] = [name for name, _ in systems]
        for _, lines in systems:
            for metric in metric_objects.values():
                result = metric.corpus_score(lines, references=None)
                signatures[result.name] = metric.get_signature().format()
                scores[result.name].append(result.format(width, True))
    if as_json:  # the fields of sacrebleu -f json (whose own writer fails on numpy floats)
        rows = [{"system": system, **{k: v if isinstance(v, str) else vars(v) for k, v in
                                      ((key, scores[key][i]) for key in list(scores)[1:])}}
                for i, system in enumerate(scores["System"])]
        return json.dumps(rows, indent=4, default=float) + "\n"
    args = Namespace(format="text", width=width, paired_bs=paired_bs, paired_ar=False, paired_bs_n=samples,
                     paired_ar_n=0)
    out, colours = io.StringIO(), Color.ENABLE_COLORS
    Color.ENABLE_COLORS = False
    try:
        with redirect_stdout(out):
            print_results_table(scores, signatures, args)
    finally:
        Color.ENABLE_COLORS = colours
    return out.getvalue()
