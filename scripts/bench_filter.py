"""mt translate as a filter: a file through a pipe at full speed, and a line sent to a waiting process
answered at once; the code of another revision (before the streaming reader) side by side.

    python scripts/bench_filter.py -m runs/multi30k_de_en [--baseline 7e4dec6] [--lines 1000] [--repeats 3]

Each run starts ``python -m mt translate -m RUN`` (start-up and model loading included, as a user
sees it) and feeds it the first N lines of test_2016_flickr.de, (a) ``cat FILE |`` through a pipe,
(b) one line while stdin stays open (the time to its answer). The baseline revision runs from a git
worktree with the same Python. Median of ``--repeats``; writes benchmarks/filter.md.
"""

from __future__ import annotations

import argparse
import gzip
import os
import select
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def pipe_seconds(code: Path, run: str, text: Path) -> float:
    env = {**os.environ, "PYTHONPATH": str(code)}
    start = time.perf_counter()
    subprocess.run(f"cat {text} | {sys.executable} -m mt translate -m {run} > /dev/null", shell=True, check=True,
                   env=env, cwd=code)
    return time.perf_counter() - start


def answer_seconds(code: Path, run: str, line: str, wait: float = 60.0) -> float:
    """Seconds from sending one line (after start-up) to its answer, stdin kept open; inf if none."""
    env = {**os.environ, "PYTHONPATH": str(code)}
    proc = subprocess.Popen([sys.executable, "-m", "mt", "translate", "-m", run], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, env=env, cwd=code)
    try:
        proc.stdin.write(b"Ein Hund.\n")  # warm-up: wait for start-up and the first answer
        proc.stdin.flush()
        if not select.select([proc.stdout], [], [], wait)[0]:
            return float("inf")
        proc.stdout.readline()
        start = time.perf_counter()
        proc.stdin.write((line + "\n").encode())
        proc.stdin.flush()
        if not select.select([proc.stdout], [], [], wait)[0]:
            return float("inf")
        proc.stdout.readline()
        return time.perf_counter() - start
    finally:
        proc.kill()
        proc.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-m", "--model", required=True)
    parser.add_argument("--baseline", default="7e4dec6", help="git revision to compare with")
    parser.add_argument("--lines", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "filter.md"))
    args = parser.parse_args()
    run = str(Path(args.model).resolve())
    with gzip.open(ROOT / "data" / "multi30k" / "test_2016_flickr.de.gz", "rt", encoding="utf-8") as f:
        lines = f.read().split("\n")[: args.lines]
    with tempfile.TemporaryDirectory() as tmp:
        text = Path(tmp) / "in.de"
        text.write_text("\n".join(lines) + "\n", encoding="utf-8")
        baseline = Path(tmp) / "baseline"
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(baseline), args.baseline],
                       check=True, capture_output=True)
        try:
            codes = {f"baseline ({args.baseline})": baseline, "this code": ROOT}
            rows = []
            for name, code in codes.items():
                pipe_seconds(code, run, text)  # warm the page cache and imports
                piped = statistics.median(pipe_seconds(code, run, text) for _ in range(args.repeats))
                answers = []
                while len(answers) < args.repeats and float("inf") not in answers:  # once is enough to never answer
                    answers.append(answer_seconds(code, run, lines[0], wait=20.0))
                answer = statistics.median(answers)
                rows.append((name, piped, answer))
        finally:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(baseline)], check=True)
    cpu = subprocess.run("lscpu | grep -o 'avx512_bf16\\|amx_bf16\\|avx2' | sort -u | tr '\\n' ' '", shell=True,
                         capture_output=True, text=True).stdout.strip()
    out = [
        "# mt translate as a filter",
        "",
        f"Produced by `python scripts/bench_filter.py -m {args.model} --baseline {args.baseline}`. Model: {args.model}; "
        f"torch threads: default; CPU flags `{cpu}`. Median of {args.repeats} runs. *File*: the first {args.lines} "
        "lines of test_2016_flickr.de through `cat FILE | mt translate -m RUN` (start-up and model loading "
        "included). *Answer*: after start-up, one line sent while stdin stays open, to its translation (the "
        "baseline waits for 2,000 lines or the end of input; gave up after 20 s: inf).",
        "",
        f"| code | file of {args.lines} lines (s) | answer to one line, stdin open (s) |",
        "|---|---:|---:|",
    ]
    out += [f"| {name} | {piped:.2f} | {answer:.2f} |" for name, piped, answer in rows]
    text_out = "\n".join(out) + "\n"
    print(text_out)
    Path(args.out).write_text(text_out, encoding="utf-8")


if __name__ == "__main__":
    main()
