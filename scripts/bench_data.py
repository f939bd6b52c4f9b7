"""Data at scale: preparation, cache size, memory and start-up of `mt train` on 1M-10M pairs.

    python scripts/bench_data.py [--sizes 1M,3M,10M] [--workdir /tmp/mt-bench-data] [--steps 100]

For each size, a synthetic corpus is built deterministically from Multi30k train (``synthetic``:
1 to 3 sentence pairs joined, ~24 words a side; seed 1, never committed). One SentencePiece model
(unigram, 8,000 pieces) is trained once, on a seeded sample of ``input_sentence_size`` 1M sentences
of the 1M corpus, and given to every run. Per size, with the real ``mt`` command in a subprocess:

- preparation: ``mt data prepare`` with a cold cache (reading + tokenizing with every core): time,
  pairs/s, bytes a pair of the cache that training reads;
- ``mt train`` (tiny model, warm cache) through the first ``--steps`` updates, then ``--resume`` for
  as many more: time from process start to the first update (the first train row of
  metrics.jsonl) and the peak RSS of the whole process tree (VmRSS summed over the tree, sampled
  every 20 ms; file-backed pages count).

Side by side on the same machine and lines (the first 1M pairs): the encoding ceiling
``SentencePieceProcessor.encode(lines, num_threads=cores)`` on lines already in memory, and a plain
Hugging Face ``datasets.map`` tokenization (batched, ``num_proc`` = cores). The table goes to
``benchmarks/data.md`` with the command and the CPU flags.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
MULTI30K = ROOT / "data" / "multi30k"
MT = [sys.executable, "-m", "mt"]


def cpu_model() -> str:
    out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    return next((line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name")),
                platform.machine())


def parse_size(text: str) -> int:
    text = text.strip().upper()
    scale = {"K": 1_000, "M": 1_000_000}.get(text[-1], 1)
    return int(float(text[:-1] if text[-1] in "KM" else text) * scale)


def synthetic(n: int, out: Path, seed: int = 1) -> tuple[Path, Path]:
    """``n`` pairs: each joins 1 to 3 random Multi30k train pairs (the same ones on both sides)."""
    src_path, tgt_path = out / "train.de", out / "train.en"
    if src_path.exists() and tgt_path.exists():
        return src_path, tgt_path
    out.mkdir(parents=True, exist_ok=True)
    with gzip.open(MULTI30K / "train.de.gz", "rt", encoding="utf-8") as f:
        de = [line.strip() for line in f]
    with gzip.open(MULTI30K / "train.en.gz", "rt", encoding="utf-8") as f:
        en = [line.strip() for line in f]
    rng = np.random.default_rng(seed)
    tmp_src, tmp_tgt = src_path.with_suffix(".de.tmp"), tgt_path.with_suffix(".en.tmp")
    with open(tmp_src, "w", encoding="utf-8") as fs, open(tmp_tgt, "w", encoding="utf-8") as ft:
        for start in range(0, n, 100_000):
            m = min(100_000, n - start)
            counts = rng.integers(1, 4, size=m)
            picks = rng.integers(0, len(de), size=(m, 3))
            fs.write("".join(" ".join(de[i] for i in row[:k]) + "\n" for row, k in zip(picks, counts)))
            ft.write("".join(" ".join(en[i] for i in row[:k]) + "\n" for row, k in zip(picks, counts)))
    os.rename(tmp_src, src_path)
    os.rename(tmp_tgt, tgt_path)
    return src_path, tgt_path


# --------------------------------------------------------------------------------------------------
# Processes and their memory


def _children() -> dict[int, list[int]]:
    tree: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            tree.setdefault(ppid, []).append(int(entry))
    return tree


def _rss_kb(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def tree_rss_mb(pid: int) -> float:
    tree, todo, total = _children(), [pid], 0
    while todo:
        p = todo.pop()
        total += _rss_kb(p)
        todo += tree.get(p, [])
    return total / 1024


def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.iterdir())


def run(cmd: list[str], *, first_row: Path | None = None, env: dict | None = None) -> dict:
    """Run ``cmd``; its wall time, peak tree RSS, and (with ``first_row``: a metrics.jsonl to watch)
    seconds from start to the first train row written after the start."""
    before = first_row.stat().st_size if first_row is not None and first_row.exists() else 0
    t0 = time.time()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, **(env or {})})
    peak, first = 0.0, None
    done = threading.Event()
    err_lines: list[str] = []
    reader = threading.Thread(target=lambda: err_lines.extend(proc.stderr), daemon=True)
    reader.start()
    while proc.poll() is None:
        peak = max(peak, tree_rss_mb(proc.pid))
        if first is None and first_row is not None and first_row.exists():
            with open(first_row, "rb") as f:
                f.seek(before)
                if b'"kind": "train"' in f.read():
                    first = time.time() - t0
        time.sleep(0.02)
    done.set()
    reader.join()
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{''.join(err_lines[-20:])}")
    return {"wall": time.time() - t0, "peak_mb": peak, "first_update": first, "log": "".join(err_lines)}


# --------------------------------------------------------------------------------------------------
# Peers: the encoding ceiling and datasets.map


def ceiling(model: Path, src: Path, tgt: Path, n: int, cores: int) -> dict:
    code = f"""
import json, sys, time, itertools
import sentencepiece as spm
sp = spm.SentencePieceProcessor(model_file={str(model)!r})
def head(p):
    with open(p, encoding="utf-8") as f:
        return [l.rstrip("\\n") for l in itertools.islice(f, {n})]
src, tgt = head({str(src)!r}), head({str(tgt)!r})
t = time.time()
for i in range(0, len(src), 100_000):
    sp.encode(src[i:i + 100_000], out_type=int, num_threads={cores})
    sp.encode(tgt[i:i + 100_000], out_type=int, num_threads={cores})
enc = time.time() - t
import datasets
datasets.disable_progress_bars()
ds = datasets.Dataset.from_dict({{"src": src, "tgt": tgt}})
def tok(b):
    return {{"src_ids": sp.encode(b["src"], out_type=int), "tgt_ids": sp.encode(b["tgt"], out_type=int)}}
t = time.time()
ds.map(tok, batched=True, batch_size=2000, num_proc={cores}, remove_columns=["src", "tgt"])
hf = time.time() - t
print(json.dumps({{"ceiling": len(src) / enc, "hf_map": len(src) / hf}}))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1M,3M,10M")
    parser.add_argument("--workdir", default=str(Path(tempfile.gettempdir()) / "mt-bench-data"))
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "data.md"))
    args = parser.parse_args()
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    sizes = [parse_size(s) for s in args.sizes.split(",")]
    cores = len(os.sched_getaffinity(0))
    flags = subprocess.run("lscpu | grep -o 'avx512_bf16\\|amx_bf16\\|avx2' | sort -u", shell=True,
                           capture_output=True, text=True).stdout.split()

    corpora = {n: synthetic(n, work / f"corpus_{n}") for n in sizes}
    first = min(sizes)
    spm_model = work / "spm8k.model"
    tok_row = None
    if not spm_model.exists():
        src, tgt = corpora[first]
        cmd = MT + ["tokenizer", "train", str(src), str(tgt), "-o", str(spm_model), "--vocab-size", "8000",
                    "--input-sentence-size", "1000000"]
        tok_row = run(cmd)
        print(f"tokenizer: {tok_row['wall']:.1f}s, peak {tok_row['peak_mb']:.0f} MB", flush=True)

    valid = f"{{src: {MULTI30K / 'val.de.gz'}, tgt: {MULTI30K / 'val.en.gz'}}}"
    rows = []
    for n in sizes:
        src, tgt = corpora[n]
        cache = work / f"cache_{n}"
        config = work / f"config_{n}.yaml"
        config.write_text(
            f"data:\n  train: {{src: {src}, tgt: {tgt}}}\n  valid: {valid}\n  cache_dir: {cache}\n  max_len: 128\n"
            f"tokenizer: {{src_model: {spm_model}}}\n"
            "model: {d_model: 64, n_heads: 2, ffn_dim: 128, encoder_layers: 1, decoder_layers: 1, dropout: 0.0}\n"
            f"train: {{max_steps: {args.steps}, max_tokens: 4096, valid_every: 100000, log_every: 1, "
            "num_threads: 2, valid_beam: 0, keep_checkpoints: 1}\n", encoding="utf-8")
        subprocess.run(["rm", "-rf", str(cache)], check=True)
        prep = run(MT + ["data", "prepare", str(config), "-q"])
        cache_bytes = max(dir_bytes(p) for p in (cache / "tokenized").iterdir())  # the training split's
        run_dir = work / f"run_{n}"
        subprocess.run(["rm", "-rf", str(run_dir)], check=True)
        metrics = run_dir / "metrics.jsonl"
        fresh = run(MT + ["train", str(config), "-o", str(run_dir), "-q"], first_row=metrics)
        resumed = run(MT + ["train", str(config), "-o", str(run_dir), "--resume", "-q",
                            f"train.max_steps={2 * args.steps}"], first_row=metrics)
        row = {"pairs": n, "prep_s": prep["wall"], "prep_pairs_s": n / prep["wall"], "prep_peak_mb": prep["peak_mb"],
               "bytes_per_pair": cache_bytes / n, "fresh_first_s": fresh["first_update"],
               "fresh_peak_mb": fresh["peak_mb"], "resume_first_s": resumed["first_update"],
               "resume_peak_mb": resumed["peak_mb"]}
        rows.append(row)
        print(json.dumps(row), flush=True)

    peers = ceiling(spm_model, *corpora[first], first, cores)
    ours = next(r for r in rows if r["pairs"] == first)["prep_pairs_s"]
    lines = [
        "# Data at scale: preparation, cache, memory, start-up",
        "",
        f"`python scripts/bench_data.py --sizes {args.sizes} --steps {args.steps}` on {cpu_model()}, "
        f"{cores} cores, CPU flags `{' '.join(flags)}`; {time.strftime('%Y-%m-%d')}.",
        "Synthetic corpora from Multi30k train (1-3 pairs joined, seed 1); one SentencePiece unigram model "
        "(8,000 pieces); tiny model (d_model 64, 1+1 layers), max_tokens 4096, 2 threads.",
        "",
        "| pairs | prepare (s) | pairs/s | prepare peak RSS (MB) | cache bytes/pair | start to 1st update (s) | "
        f"peak RSS, {args.steps} updates (MB) | resume: start to 1st update (s) | resume peak RSS (MB) |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(f"| {r['pairs']:,} | {r['prep_s']:.1f} | {r['prep_pairs_s']:,.0f} | {r['prep_peak_mb']:.0f} | "
                     f"{r['bytes_per_pair']:.0f} | {r['fresh_first_s']:.1f} | {r['fresh_peak_mb']:.0f} | "
                     f"{r['resume_first_s']:.1f} | {r['resume_peak_mb']:.0f} |")
    if len(rows) > 1:
        a, b = rows[0], rows[-1]
        per_m = (b["pairs"] - a["pairs"]) / 1e6
        lines += ["", f"Growth from {a['pairs']:,} to {b['pairs']:,} pairs: start-up "
                  f"{(b['fresh_first_s'] - a['fresh_first_s']) / per_m:+.2f} s per million pairs (resume "
                  f"{(b['resume_first_s'] - a['resume_first_s']) / per_m:+.2f}), peak RSS "
                  f"{(b['fresh_peak_mb'] - a['fresh_peak_mb']) / per_m:+.1f} MB per million "
                  f"({100 * (b['fresh_peak_mb'] / a['fresh_peak_mb'] - 1):+.1f}% at {b['pairs']:,})."]
    lines += ["", f"Tokenizing throughput on the first {first:,} pairs (pairs/s, both sides):", "",
              "| `mt data prepare` (reading + tokenizing + writing) | `sp.encode(lines, num_threads=cores)` (ceiling) | "
              "HF `datasets.map` | mt / ceiling |", "|---:|---:|---:|---:|",
              f"| {ours:,.0f} | {peers['ceiling']:,.0f} | {peers['hf_map']:,.0f} | {ours / peers['ceiling']:.2f} |"]
    if tok_row is not None:
        lines += ["", f"Tokenizer training (`mt tokenizer train`, input_sentence_size 1M, on the {first:,}-pair corpus): "
                  f"{tok_row['wall']:.1f} s, peak RSS {tok_row['peak_mb']:.0f} MB."]
    Path(args.out).write_text("\n".join(lines) + "\n", encoding="utf-8")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
