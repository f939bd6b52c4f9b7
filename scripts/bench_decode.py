"""Decoding speed of ``mt``: beam search with and without the KV cache, side by side in one run.

    python scripts/bench_decode.py -m RUN_DIR [--src data/multi30k/test_2016_flickr.de.gz] [--beam 5]

Translates the whole source file with each setting, ``--repeats`` times after one warm-up pass over
the first 100 lines, and reports the median sentences/s and target tokens/s, the ratio against the
uncached search, and BLEU when ``--ref`` is given. Timing covers the decode loop only (tokenized
input to detokenized output), on ``--threads`` CPU threads. Writes a markdown table to ``--out``.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from pathlib import Path

import torch

from mt.evaluate import read_text, score
from mt.translate import Translator

ROOT = Path(__file__).resolve().parents[1]


def run(translator: Translator, lines: list[str], use_cache: bool) -> tuple[float, list[str], int]:
    """Seconds, outputs and output tokens for translating ``lines`` with or without the cache."""
    translator.use_cache = use_cache
    start = time.perf_counter()
    results = list(translator.translate(lines))
    seconds = time.perf_counter() - start
    tokens = sum(len(r.hypotheses[0].tokens) + 1 for r in results if r.hypotheses)
    return seconds, [r.texts[0] for r in results], tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-m", "--model", required=True, help="run directory")
    parser.add_argument("--src", default=str(ROOT / "data/multi30k/test_2016_flickr.de.gz"))
    parser.add_argument("--ref", default=str(ROOT / "data/multi30k/test_2016_flickr.en.gz"))
    parser.add_argument("--beam", type=int, default=5)
    parser.add_argument("--batch-tokens", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=str(ROOT / "benchmarks/decode_cache.md"))
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    translator = Translator.from_run(args.model, device="cpu", beam=args.beam, batch_tokens=args.batch_tokens)
    lines = read_text(args.src)
    refs = read_text(args.ref) if args.ref else None
    rows = []
    for name, use_cache in (("mt beam, KV cache", True), ("mt beam, no cache (full prefix each step)", False)):
        run(translator, lines[:100], use_cache)  # warm-up
        timings = [run(translator, lines, use_cache) for _ in range(args.repeats)]
        seconds = statistics.median(t[0] for t in timings)
        _, outputs, tokens = timings[0]
        bleu = score(outputs, refs, ["bleu"])[0].score if refs else float("nan")
        rows.append((name, seconds, len(lines) / seconds, tokens / seconds, bleu))
        print(f"{name}: {seconds:.2f}s, {len(lines) / seconds:.1f} sentences/s, BLEU {bleu:.2f}", flush=True)
    base = rows[1][2]
    d = translator.decode
    table = [
        f"# Decoding: KV cache vs none (beam {d.beam}, lenpen {d.lenpen}, batch_tokens {d.batch_tokens})",
        "",
        f"Command: `python scripts/bench_decode.py -m {args.model} --beam {args.beam} --repeats {args.repeats}`  ",
        f"Input: {args.src} ({len(lines)} lines); {args.threads} CPU threads; torch {torch.__version__}; "
        f"{platform.processor() or platform.machine()}; median of {args.repeats} runs after a warm-up; "
        "timed: the decode loop (tokenized input to detokenized output).",
        "",
        "| setting | seconds | sentences/s | target tokens/s | speed-up | BLEU |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, seconds, sps, tps, bleu in rows:
        table.append(f"| {name} | {seconds:.2f} | {sps:.1f} | {tps:.0f} | {sps / base:.2f}x | {bleu:.2f} |")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(table) + "\n", encoding="utf-8")
    print("\n".join(table))


if __name__ == "__main__":
    main()
