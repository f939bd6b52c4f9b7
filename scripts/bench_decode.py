"""Decoding speed side by side: `mt translate` (fp32, bf16, int8; optionally without its KV cache),
Hugging Face ``generate()`` on the exported weights (``mt export``: M2M100 for a pre-norm run, FSMT
for a post-norm one, whose attention is plain matrix products, not SDPA: compare HF ratios only
between runs of one norm), and CTranslate2 on the converted weights in every compute type this
CPU supports.

    python scripts/bench_decode.py -m RUN_DIR [--beam 5] [--repeats 3] [--engines mt,mt-mkl,mt-bf16,mt-int8,hf,ct2]
                                   [--batches 64,128,256] [--workers 1,2]

The peers (HF and CTranslate2) run at every batch size of ``--batches`` (length-sorted sentences per
batch; ``ct2-int8@128`` names one), and each is compared at its fastest: CTranslate2 on 2 threads
runs 10-29% faster with 128-256 sentences per batch than with 64 (an AMD EPYC Zen 4). mt batches by
``--batch-tokens`` source tokens, its default. The peers also run with each number of workers of
``--workers`` (``ct2-int8@128/w2``): that many batches decoded at once, each on an equal share of
the threads (CTranslate2's ``inter_threads``, HF's ``generate()`` on a thread per worker), and each
is compared at its fastest there too: on 2 threads of an AMD EPYC (Zen 3, AVX2), over two runs,
CTranslate2 with 2 workers of 1 thread ran 1.5-1.9x faster than with 1 of 2 threads at 64 sentences
per batch and 1.0-1.5x at 128-256 (a 1,000-line input makes only 4 batches of 256), HF 1.1-1.3x;
mt, whose operations already divide well between threads, gained nothing from it (a trial in
``mt translate``: 1.00x fp32, 1.02x int8).

Every engine translates the same file (default: Multi30k test_2016_flickr, 1,000 lines) on
``--threads`` CPU threads with the same beam size, length penalty and per-batch length limit
(a·source_length + b). Timed, for every engine alike: the decode loop from text lines to
detokenized lines (SentencePiece encoding, batching, search, decoding), models already loaded; one
warm-up pass over 100 lines, then the median of ``--repeats`` passes, taken round robin across the
engines (this machine's speed drifts by 10-20% over minutes; interleaving spreads that evenly). Each
engine runs in its own worker process, so that no engine's thread pool slows another's. ``ct2``
stands for every CTranslate2 compute type of ``ctranslate2.get_supported_compute_types("cpu")``
among float32, int8, int8_float32, int8_bfloat16 and bfloat16 (or name one: ``ct2-int8``).
``mt-mkl`` is mt's fp32 with its matrix products through MKL, PyTorch's default (``MT_FP32_GEMM=mkl``;
``mt`` takes the library ``mt.linear`` chooses for this CPU).
Reports sentences/s, target tokens/s, the ratio against HF at its fastest, BLEU, and the share of the machine's
GEMM ceiling in the row's precision (``scripts/machine.py``, measured in the same run): the matmul
FLOPs of mt's own fp32 search on this input (counted once with ``torch.utils.flop_counter``; the
same work for every row) per second. Writes a markdown table to ``--out``.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mt.allocator import keep_freed_memory  # noqa: E402
from mt.batch import pad  # noqa: E402
from mt.evaluate import read_text, score  # noqa: E402
from mt.int8 import unavailable as int8_unavailable  # noqa: E402
from mt.linear import ENV as GEMM_ENV, fp32_gemm  # noqa: E402
from mt.tokenizer import EOS_ID, PAD_ID  # noqa: E402
from mt.device import choose_dtype, slow_bf16_warning  # noqa: E402
from mt.translate import Translator  # noqa: E402
from machine import cpu, matmul_ceiling  # noqa: E402

Engine = Callable[[list[str]], list[str]]


CT2_TYPES = ("float32", "int8", "int8_float32", "int8_bfloat16", "bfloat16")


def split(engine: str) -> tuple[str, int | None, int]:
    """``ct2-int8@128/w2`` -> ("ct2-int8", 128, 2): the engine, its sentences per batch (None: mt's
    own batching by tokens) and its workers (1 when not given; mt is always one)."""
    engine, _, workers = engine.partition("/w")
    name, _, batch = engine.partition("@")
    return name, int(batch) if batch else None, int(workers) if workers else 1


def in_parallel(translate_batch: Callable, batches: list, workers: int) -> list:
    """``translate_batch`` of every batch, in order; with several workers, that many batches at once,
    each on a thread of its own (torch's intra-op threads set to the worker's share first; threads
    started then take that share for their own operations)."""
    if workers == 1:
        return [translate_batch(b) for b in batches]
    from concurrent.futures import ThreadPoolExecutor

    before = torch.get_num_threads()
    torch.set_num_threads(max(1, before // workers))
    try:
        with ThreadPoolExecutor(workers) as pool:
            return list(pool.map(translate_batch, batches))
    finally:
        torch.set_num_threads(before)


def precision(engine: str) -> str:
    """The precision whose GEMM ceiling an engine's row is compared with."""
    engine = split(engine)[0]
    if engine.endswith("int8") or "int8_" in engine:
        return "int8"
    return "bf16" if engine.endswith(("bf16", "bfloat16")) else "fp32"


def mt_engine(run_dir: str, beam: int, batch_tokens: int, use_cache: bool, dtype: str = "fp32") -> Engine:
    translator = Translator.from_run(run_dir, device="cpu", beam=beam, batch_tokens=batch_tokens, dtype=dtype)
    translator.use_cache = use_cache
    return translator.translate_lines


def _batches(lines: list[str], tok, size: int):
    """Length-sorted batches of ``size`` encoded lines, with their positions."""
    ids = tok.encode(lines)
    order = sorted(range(len(lines)), key=lambda i: len(ids[i]))
    for start in range(0, len(order), size):
        chunk = order[start: start + size]
        yield chunk, [ids[i] for i in chunk]


def hf_engine(hf_dir: Path, tok, beam: int, lenpen: float, a: float, b: int, batch: int, workers: int) -> Engine:
    import transformers

    model = transformers.AutoModelForSeq2SeqLM.from_pretrained(hf_dir).eval()

    def generate(ids: list[list[int]]) -> list[list[int]]:
        src = pad(ids)
        limit = int(a * max(map(len, ids)) + b)
        with torch.inference_mode():
            return model.generate(input_ids=src, attention_mask=(src != PAD_ID).long(), num_beams=beam,
                                  length_penalty=lenpen, early_stopping=True, max_new_tokens=limit,
                                  do_sample=False).tolist()

    def translate(lines: list[str]) -> list[str]:
        out = [""] * len(lines)
        batches = list(_batches(lines, tok, batch))
        for (chunk, _), rows in zip(batches, in_parallel(generate, [ids for _, ids in batches], workers)):
            for i, row in zip(chunk, rows):
                row = row[1:]
                out[i] = tok.decode([row[: row.index(EOS_ID)] if EOS_ID in row else row])[0]
        return out

    return translate


def ct2_engine(ct2_dir: Path, tok, beam: int, lenpen: float, a: float, b: int, batch: int, compute_type: str,
               threads: int, workers: int) -> Engine:
    """CTranslate2 with ``workers`` translators (its ``inter_threads``) of ``threads // workers``
    threads each; every batch is submitted at once (``asynchronous``), so that each worker takes
    the next batch as it finishes one."""
    import ctranslate2

    translator = ctranslate2.Translator(str(ct2_dir), device="cpu", compute_type=compute_type,
                                        inter_threads=workers, intra_threads=max(1, threads // workers))

    def translate(lines: list[str]) -> list[str]:
        out = [""] * len(lines)
        pending = []
        for chunk, ids in _batches(lines, tok, batch):
            pieces = [[tok.sp.id_to_piece(i) for i in seq] for seq in ids]
            limit = int(a * max(map(len, ids)) + b)
            pending.append((chunk, translator.translate_batch(pieces, beam_size=beam, length_penalty=lenpen,
                                                              max_decoding_length=limit, max_batch_size=batch,
                                                              asynchronous=True)))
        for chunk, results in pending:
            for i, r in zip(chunk, results):
                out[i] = tok.decode([[tok.sp.piece_to_id(p) for p in r.result().hypotheses[0]]])[0]
        return out

    return translate


def _serve(conn, name: str, args: argparse.Namespace, dirs: dict[str, Path]) -> None:
    """Worker process: build engine ``name``, warm it up, then translate the input file on every
    "go" and send back (seconds, outputs); stop on None."""
    torch.set_num_threads(args.threads)
    try:
        lines = read_text(args.src)
        reference = Translator.from_run(args.model, device="cpu", beam=args.beam, dtype="fp32")  # its tokenizers and decoding settings
        d, tok = reference.decode, reference.tgt_tok
        limits = (d.lenpen, d.max_len_a, d.max_len_b)
        engine_name, batch, workers = split(name)
        if engine_name.startswith("mt"):
            keep_freed_memory()  # as every mt command does (mt/allocator.py); the peers keep the C defaults
            if engine_name == "mt-mkl":
                os.environ[GEMM_ENV] = "mkl"
                fp32_gemm.cache_clear()
            dtype = {"mt-bf16": "bf16", "mt-int8": "int8"}.get(engine_name, "fp32")
            engine = mt_engine(args.model, args.beam, args.batch_tokens, use_cache=engine_name != "mt-nocache",
                               dtype=dtype)
        elif engine_name == "hf":
            engine = hf_engine(dirs["hf"], tok, args.beam, *limits, batch, workers)
        else:
            engine = ct2_engine(dirs["ct2"], tok, args.beam, *limits, batch, engine_name[4:], args.threads, workers)
        engine(lines[:100])  # warm-up
        conn.send("ready")
        while conn.recv() is not None:
            start = time.perf_counter()
            outputs = engine(lines)
            conn.send((time.perf_counter() - start, outputs))
    except Exception as e:  # the parent reports it and stops
        conn.send(("failed", f"{type(e).__name__}: {e}"))


def _answer(conn, name: str):
    """The worker's next message; a worker that failed or died ends the benchmark with its error."""
    try:
        message = conn.recv()
    except EOFError:
        raise SystemExit(f"bench_decode: the {name} worker died") from None
    if isinstance(message, tuple) and message[0] == "failed":
        raise SystemExit(f"bench_decode: {name} failed: {message[1]}")
    return message


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-m", "--model", required=True, help="run directory")
    parser.add_argument("--src", default=str(ROOT / "data/multi30k/test_2016_flickr.de.gz"))
    parser.add_argument("--ref", default=str(ROOT / "data/multi30k/test_2016_flickr.en.gz"))
    parser.add_argument("--beam", type=int, default=5)
    parser.add_argument("--batches", default="64,128,256",
                        help="sentences per batch for HF and CTranslate2: each peer runs at every size")
    parser.add_argument("--workers", default="1,2",
                        help="for HF and CTranslate2, batches decoded at once, each worker on an equal share of "
                             "--threads: each peer runs at every count (``/w2`` names one: CTranslate2's "
                             "inter_threads 2, HF's generate() on 2 threads of its own)")
    parser.add_argument("--batch-tokens", type=int, default=2048, help="source tokens per batch for mt")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--engines", default="mt,mt-mkl,mt-bf16,mt-int8,hf,ct2")
    parser.add_argument("--out", default=str(ROOT / "benchmarks/speed_decode.md"))
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    lines, refs = read_text(args.src), read_text(args.ref)
    translator = Translator.from_run(args.model, device="cpu", beam=args.beam, dtype="fp32")  # its tokenizers and decoding settings
    tok, d = translator.tgt_tok, translator.decode
    names = []
    batches = [int(b) for b in args.batches.split(",")]
    worker_counts = [int(w) for w in args.workers.split(",")]
    for name in args.engines.split(","):
        if name == "ct2":  # every compute type this CPU supports
            import ctranslate2

            supported = ctranslate2.get_supported_compute_types("cpu")
            peers = [f"ct2-{t}" for t in CT2_TYPES if t in supported]
        else:
            peers = [name]
        for peer in peers:
            if peer.startswith("mt"):
                if "/w" in peer or "@" in peer:
                    raise SystemExit(f"bench_decode: {peer}: mt engines take no batch size or workers "
                                     "(mt batches by --batch-tokens, on all --threads)")
                names.append(peer)
                continue
            for sized in [peer] if "@" in peer else [f"{peer}@{b}" for b in batches]:
                names += [sized] if "/w" in sized else [f"{sized}/w{w}" for w in worker_counts]
    notes = []
    if "mt-bf16" in names and slow_bf16_warning(torch.device("cpu")):
        names.remove("mt-bf16")  # emulated bf16 would take hours and say nothing about mt
        notes.append("mt --dtype bf16 not measured: this CPU has no native bf16 instructions.")
    if "mt-int8" in names and int8_unavailable():
        names.remove("mt-int8")
        notes.append(f"mt --dtype int8 not measured: {int8_unavailable()}.")
    from torch.utils.flop_counter import FlopCounterMode

    # the work: mt's fp32 search on this input, counted through MKL's products (the counter does not
    # see oneDNN's); then the library mt.linear chooses here again
    chosen = os.environ.get(GEMM_ENV)
    os.environ[GEMM_ENV] = "mkl"
    fp32_gemm.cache_clear()
    with FlopCounterMode(display=False) as counter:
        mt_engine(args.model, args.beam, args.batch_tokens, use_cache=True)(lines)
    work = counter.get_total_flops()
    if chosen is None:
        del os.environ[GEMM_ENV]
    else:
        os.environ[GEMM_ENV] = chosen
    fp32_gemm.cache_clear()
    if "mt-mkl" in names and fp32_gemm()[0] == "mkl":
        names.remove("mt-mkl")  # the same as mt here
    with tempfile.TemporaryDirectory() as tmp:
        dirs = {}
        if any(n.startswith(("hf", "ct2")) for n in names):
            from mt.export import to_ctranslate2, to_hf

            dirs["hf"] = to_hf(args.model, Path(tmp) / "hf")
            if any(n.startswith("ct2") for n in names):
                dirs["ct2"] = to_ctranslate2(args.model, Path(tmp) / "ct2")
        # one process per engine: CTranslate2's thread pool slows PyTorch down by ~30% in a process
        # where both have run (measured here); only one process computes at a time
        context = multiprocessing.get_context("spawn")
        workers = {}
        for name in names:
            parent, child = context.Pipe()
            process = context.Process(target=_serve, args=(child, name, args, dirs), daemon=True)
            process.start()
            child.close()  # only the worker holds its end: if it dies, recv() raises EOFError
            workers[name] = (process, parent)
        for name, (_, conn) in workers.items():
            _answer(conn, name)  # "ready"
        # passes interleaved round robin (the order rotating), so that the machine's drift over the
        # minutes of a run hits every engine alike
        timings: dict[str, list[float]] = {name: [] for name in names}
        outputs: dict[str, list[str]] = {}
        for r in range(args.repeats):
            for name in names[r % len(names):] + names[: r % len(names)]:
                conn = workers[name][1]
                conn.send("go")
                seconds, outputs[name] = _answer(conn, name)
                timings[name].append(seconds)
                print(f"pass {r + 1}: {name} {seconds:.2f}s", flush=True)
                time.sleep(0.5)  # let thread pools that spin after work go idle
        for process, conn in workers.values():
            conn.send(None)
            process.join()
        rows = []
        for name in names:
            seconds = statistics.median(timings[name])
            assert len(outputs[name]) == len(lines)
            tokens = sum(len(ids) for ids in tok.encode(outputs[name]))  # pieces + </s>
            bleu = score(outputs[name], [refs], ["bleu"])[0].score
            rows.append((name, seconds, len(lines) / seconds, tokens / seconds, bleu))
            print(f"{name}: {seconds:.2f}s, {len(lines) / seconds:.1f} sentences/s, BLEU {bleu:.2f}", flush=True)
    def fastest(prefix: str) -> tuple[str, float] | None:
        """The fastest row (name, sentences/s) of the engines named ``prefix`` (at any batch size and
        number of workers)."""
        found = [(r[0], r[2]) for r in rows if split(r[0])[0].startswith(prefix)]
        return max(found, key=lambda r: r[1]) if found else None

    base = (fastest("hf") or (None, None))[1]
    labels = {"mt": f"mt translate --dtype fp32 (KV cache, {fp32_gemm()[0]})", "mt-mkl": "mt, fp32 through MKL", "mt-bf16": "mt translate --dtype bf16",
              "mt-int8": "mt translate --dtype int8",
              "mt-nocache": "mt, no cache (full prefix each step)",
              "hf": "HF generate() (fp32)", **{f"ct2-{t}": f"CTranslate2 {t}" for t in CT2_TYPES}}
    auto, why = choose_dtype("auto", torch.device("cpu"), int8_missing=int8_unavailable())
    precisions = sorted({precision(name) for name in names})
    ceilings = {p: matmul_ceiling(p, args.threads) for p in precisions}
    table = [
        f"# Decoding speed: beam {args.beam}, length penalty {d.lenpen}, length limit {d.max_len_a}·src + {d.max_len_b}",
        "",
        f"Command: `python scripts/bench_decode.py -m {args.model} --beam {args.beam} --repeats {args.repeats} "
        f"--engines {args.engines} --batches {args.batches} --workers {args.workers}`  ",
        f"Input: {Path(args.src).name} ({len(lines)} lines). Machine: {cpu()}; {args.threads} threads, "
        f"torch {torch.__version__}; `--dtype auto` here: {auto} ({why.removeprefix('auto: ')}). GEMM ceiling "
        "(this run): " + ", ".join(f"{p} {c:.0f} G{'OP' if p == 'int8' else 'FLOP'}/s" for p, c in ceilings.items())
        + f"; the work counted: {work / 1e9:.0f} GFLOP (mt's fp32 search on this input). "
        "Timed for every engine: text lines to detokenized lines (models loaded), "
        f"median of {args.repeats} passes after a warm-up; each engine in its own process, the engines' passes "
        f"interleaved round robin. mt batches by {args.batch_tokens} source tokens; "
        f"HF and CTranslate2 by {args.batches} length-sorted sentences (each size a row; ratios against HF "
        f"at its fastest), each with {args.workers} workers decoding whole batches at once on an equal share "
        "of the threads (CTranslate2's inter_threads; HF's generate() on a thread per worker). mt's processes "
        "keep freed memory for reuse, "
        "as every mt command does (mt/allocator.py); HF and CTranslate2 run with the C allocator's defaults."
        + "".join(f" {n}" for n in notes),
        "",
        "| engine | seconds | sentences/s | target tokens/s | vs HF | BLEU | share of ceiling |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, seconds, sps, tps, bleu in rows:
        ratio = f"{sps / base:.2f}x" if base else "-"
        share = work / seconds / 1e9 / ceilings[precision(name)]
        peer, batch, workers = split(name)
        share_of = max(1, args.threads // workers)
        label = labels[peer] + (f", {batch} sentences per batch" if batch else "") + (
            "" if peer.startswith("mt") else
            f", {workers} worker{'s' if workers > 1 else ''} of {share_of} thread{'s' if share_of > 1 else ''}")
        table.append(f"| {label} | {seconds:.2f} | {sps:.1f} | {tps:.0f} | {ratio} | {bleu:.2f} | "
                     f"{share:.1%} ({precision(name)}) |")
    mt_fp32 = next(((r[0], r[2]) for r in rows if r[0] == "mt"), None)
    comparisons = [("mt fp32 against HF", mt_fp32, fastest("hf")),
                   ("mt fp32 against CTranslate2 float32", mt_fp32, fastest("ct2-float32")),
                   ("the fastest mt mode against the fastest CTranslate2 compute type", fastest("mt"), fastest("ct2"))]
    for what, ours, theirs in comparisons:
        if ours and theirs:
            table.append(f"\n{what}, each at its fastest: {ours[0]} {ours[1]:.1f} against {theirs[0]} "
                         f"{theirs[1]:.1f} sentences/s, {ours[1] / theirs[1]:.2f}x.")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(table) + "\n", encoding="utf-8")
    print("\n".join(table))


if __name__ == "__main__":
    main()
