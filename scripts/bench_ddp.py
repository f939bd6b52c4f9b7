"""Training on 2 processes (DDP, gloo) against 1 process, on the reference model and a 1M-pair corpus.

    python scripts/bench_ddp.py [--steps 60] [--precision fp32] [--workdir /tmp/mt-bench-data]

Four runs of ``mt train`` on the same data, model (the reference recipe's shape: d_model 256,
3+3 layers, 8k joint vocabulary, max_tokens 2048, fp32) and seed, one after the other:
1 process x 1 thread, 1 process x 2 threads, ``--nproc 2`` (2 ranks x 1 thread), and two separate
1-thread runs at the same time: the most two processes get from this machine, with no gradients
exchanged and no data shared (their tokens/s summed). Throughput is
the median ``tokens_per_s`` of the train rows of metrics.jsonl after the first two (rank 0 logs the
update's tokens over all ranks); the data share is the time spent making batches over the window's
time (``data_share``); memory is the summed PSS (``/proc/PID/smaps_rollup``) of the process tree,
sampled every 50 ms: shared pages (libraries, the page cache behind ``pread``) count once.
The corpus is the synthetic 1M-pair one of ``scripts/bench_data.py`` (built if missing).
The table goes to ``benchmarks/ddp.md`` with the command and the CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

from bench_data import MULTI30K, _children, cpu_model, synthetic  # noqa: E402

CEILING = "2 independent processes x 1 thread (no DDP: the machine's ceiling)"


def pss_mb(pid: int) -> float:
    tree, todo, total = _children(), [pid], 0
    while todo:
        p = todo.pop()
        try:
            with open(f"/proc/{p}/smaps_rollup") as f:
                total += next(int(line.split()[1]) for line in f if line.startswith("Pss:"))
        except (OSError, StopIteration):
            pass
        todo += tree.get(p, [])
    return total / 1024


def train(config: Path, run_dirs: list[Path], threads: int, nproc: int, steps: int) -> dict:
    """``mt train`` into each of ``run_dirs`` at the same time (one: a plain run); the summed tokens/s
    of their medians, the median data share, the peak of their summed PSS."""
    cmds = [[sys.executable, "-m", "mt", "train", str(config), "-o", str(run_dir), "-q", f"train.max_steps={steps}",
             f"train.num_threads={threads}"] + (["--nproc", str(nproc)] if nproc > 1 else []) for run_dir in run_dirs]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    procs = [subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE, text=True) for cmd in cmds]
    peak = 0.0
    while any(proc.poll() is None for proc in procs):
        peak = max(peak, sum(pss_mb(proc.pid) for proc in procs))
        time.sleep(0.05)
    for cmd, proc in zip(cmds, procs):
        if proc.returncode:
            raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr.read()}")
    speeds, shares = [], []
    for run_dir in run_dirs:
        rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        train_rows = [r for r in rows if r["kind"] == "train"][2:]
        speeds.append(statistics.median(r["tokens_per_s"] for r in train_rows))
        shares += [r["data_share"] for r in train_rows]
    return {"tokens_per_s": sum(speeds), "data_share": statistics.median(shares), "pss_mb": peak}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "auto"])
    parser.add_argument("--workdir", default=str(Path(tempfile.gettempdir()) / "mt-bench-data"))
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "ddp.md"))
    args = parser.parse_args()
    work = Path(args.workdir)
    src, tgt = synthetic(1_000_000, work / "corpus_1000000")
    spm_model = work / "spm8k.model"
    if not spm_model.exists():
        subprocess.run([sys.executable, "-m", "mt", "tokenizer", "train", str(src), str(tgt), "-o", str(spm_model),
                        "--vocab-size", "8000", "--input-sentence-size", "1000000"], check=True)
    config = work / "config_ddp.yaml"
    config.write_text(
        f"data:\n  train: {{src: {src}, tgt: {tgt}}}\n  valid: {{src: {MULTI30K / 'val.de.gz'}, tgt: {MULTI30K / 'val.en.gz'}}}\n"
        f"  cache_dir: {work / 'cache_1000000'}\n  max_len: 128\ntokenizer: {{src_model: {spm_model}}}\n"
        "model: {d_model: 256, n_heads: 4, ffn_dim: 1024, encoder_layers: 3, decoder_layers: 3, dropout: 0.1}\n"
        "train: {max_tokens: 2048, lr: 1.5e-3, warmup_steps: 200, log_every: 5, valid_every: 100000, "
        f"keep_checkpoints: 1, precision: {args.precision}}}\n", encoding="utf-8")
    subprocess.run([sys.executable, "-m", "mt", "data", "prepare", str(config), "-q"], check=True)
    results = {}
    for name, threads, nproc, copies in (("1 process x 1 thread", 1, 1, 1), ("1 process x 2 threads", 2, 1, 1),
                                         ("2 ranks x 1 thread (--nproc 2)", 1, 2, 1), (CEILING, 1, 1, 2)):
        run_dirs = [work / f"run_ddp_{threads}_{nproc}_{k}" for k in range(copies)]
        subprocess.run(["rm", "-rf", *map(str, run_dirs)], check=True)
        results[name] = train(config, run_dirs, threads, nproc, args.steps)
        print(name, json.dumps(results[name]), flush=True)
    base = results["1 process x 1 thread"]
    flags = subprocess.run("lscpu | grep -o 'avx512_bf16\\|amx_bf16\\|avx2' | sort -u", shell=True,
                           capture_output=True, text=True).stdout.split()
    lines = ["# Training on 2 processes (DDP) vs 1", "",
             f"`python scripts/bench_ddp.py --steps {args.steps} --precision {args.precision}` on {cpu_model()}, {os.cpu_count()} cores, CPU flags "
             f"`{' '.join(flags)}`; {time.strftime('%Y-%m-%d')}. Reference shape (d_model 256, 3+3 layers, 8k joint "
             f"vocabulary), max_tokens 2048 per rank, {args.precision}, the 1M-pair synthetic corpus.", "",
             "| run | tokens/s | vs 1 x 1 | time making batches | summed PSS (MB) |", "|---|---:|---:|---:|---:|"]
    for name, r in results.items():
        lines.append(f"| {name} | {r['tokens_per_s']:,.0f} | {r['tokens_per_s'] / base['tokens_per_s']:.2f}x | "
                     f"{100 * r['data_share']:.1f}% | {r['pss_mb']:.0f} |")
    two, one, apart = results["2 ranks x 1 thread (--nproc 2)"], results["1 process x 2 threads"], results[CEILING]
    lines += ["", f"2 ranks: {two['tokens_per_s'] / base['tokens_per_s']:.2f}x one process on one thread, "
              f"{two['tokens_per_s'] / one['tokens_per_s']:.2f}x one process on two threads; summed PSS "
              f"{two['pss_mb'] / base['pss_mb']:.2f}x one process. Two processes that share nothing (the last row) "
              f"make {apart['tokens_per_s'] / base['tokens_per_s']:.2f}x one and hold "
              f"{apart['pss_mb'] / base['pss_mb']:.2f}x its memory: what this machine gives two processes at "
              f"all, so the 2 ranks reach {two['tokens_per_s'] / apart['tokens_per_s']:.0%} of its throughput "
              f"with {two['pss_mb'] / apart['pss_mb']:.2f}x its memory."]
    Path(args.out).write_text("\n".join(lines) + "\n", encoding="utf-8")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
