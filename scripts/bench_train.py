"""Training speed: `mt` vs Hugging Face transformers on the same model shape, batches and precision,
and each against the machine's matmul ceiling in that precision.

    python scripts/bench_train.py [--config configs/multi30k_de_en.yaml] [--steps 8] [--repeats 3]

The peer is ``M2M100ForConditionalGeneration`` built from ``mt.export.hf_config`` (the same pre-norm
encoder-decoder, random init, SDPA attention), also for a config with ``model.norm: post``: mt's
post-norm model does the same work but for the two final LayerNorms it lacks, and transformers'
post-norm port (FSMT) computes attention with plain matrix products, not SDPA. Both run a full
training step on the same token-bucketed Multi30k batches: forward, label-smoothed cross-entropy,
backward, gradient clipping, fused AdamW step. Each timed pass is a process of its own (so peak RSS
is its own) that does ``--warmup`` steps and an untimed pass over the ``--steps`` batches, then one
timed pass over the same batches (oneDNN, which computes bf16 products on a CPU, builds a kernel for each new matrix shape on
first use, 4-24 ms each on a Xeon with AMX; a training run meets its shapes again epoch after epoch,
about 20 batch sizes per epoch at 2,048 tokens, so the timed pass finds them built, as a run's later
epochs do); the passes of every engine and
precision of a budget alternate, ``--repeats`` each, so that the machine's drift over the minutes of a
run hits all alike; the table gives the median target tokens/s, the ratios mt / HF and mt / mt's fp32,
the peak RSS, and the share of the matmul ceiling: the step's matmul FLOPs (counted from the model's
shape and the batches' padded sizes, the same for both engines) per second over the best GEMM
GFLOP/s of that precision on this machine (in fp32 the better of MKL and oneDNN;
``scripts/machine.py``, measured in the same run). In fp32 a third engine, ``mt-mkl``, is mt with
its matrix products through MKL, PyTorch's default (``MT_FP32_GEMM=mkl``), where ``mt.linear``
chooses oneDNN for this CPU. Threads: ``torch.set_num_threads``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mt.config import load_config  # noqa: E402
from mt.batch import Batch  # noqa: E402
from mt.tokenizer import PAD_ID  # noqa: E402
from machine import cpu, matmul_ceiling  # noqa: E402


def step_flops(m, vocab: int, src: torch.Tensor, tgt_out: torch.Tensor) -> float:
    """Matmul FLOPs of one training step on a batch: forward (projections, feed-forward, attention
    scores and sums over the padded shapes, the output projection over real target tokens) times 3
    (the backward pass computes two products for each one of the forward)."""
    (B, S), T = src.shape, tgt_out.shape[1]
    d, f = m.d_model, m.ffn_dim
    encoder = B * S * (4 * d * d + 2 * d * f) + 2 * B * S * S * d
    decoder = B * T * (6 * d * d + 2 * d * f) + B * S * 2 * d * d + 2 * B * T * T * d + 2 * B * T * S * d
    output = int((tgt_out != PAD_ID).sum()) * vocab * d
    macs = m.encoder_layers * encoder + m.decoder_layers * decoder + output
    return 3 * 2 * macs


def prepare_batches(config: str, count: int, workdir: Path, max_tokens: int = 0) -> Path:
    """The first ``count`` training batches of epoch 1, saved for the workers."""
    from mt.run import Run
    from mt.prepare import load_split, prepare_tokenizers

    cfg = load_config(config)
    src_tok, tgt_tok = prepare_tokenizers(cfg, Run(workdir), log=print)
    data = load_split(cfg, "train", src_tok, tgt_tok)
    sampler = data.sampler(max_tokens or cfg.train.max_tokens, shuffle=True, seed=cfg.train.seed)
    batches = [data.batch(i) for i in sampler.batches(0)[:count]]
    path = workdir / "batches.pt"
    torch.save({"vocab": src_tok.vocab_size, "config": str(config),
                "batches": [(b.src, b.tgt_in, b.tgt_out) for b in batches]}, path)
    return path


def worker(engine: str, precision: str, batches_file: str, warmup: int, steps: int, repeats: int,
           threads: int) -> dict:
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    saved = torch.load(batches_file, weights_only=True)
    cfg = load_config(saved["config"])
    vocab, eps = saved["vocab"], cfg.train.label_smoothing
    batches = [Batch(s, i, o, None) for s, i, o in saved["batches"]]
    if engine.startswith("mt"):
        if engine == "mt-mkl":
            os.environ["MT_FP32_GEMM"] = "mkl"
        from mt.allocator import keep_freed_memory
        from mt.model import Transformer

        keep_freed_memory()  # as every mt command does; HF keeps the C allocator's defaults
        from mt.train import batch_loss

        model = Transformer(cfg.model, vocab, vocab)

        def loss_of(batch: Batch) -> torch.Tensor:
            return batch_loss(model, batch, eps)[0]
    else:
        from mt.export import hf_config

        import transformers

        model = transformers.M2M100ForConditionalGeneration(hf_config(cfg, vocab))

        def loss_of(batch: Batch) -> torch.Tensor:
            logits = model(input_ids=batch.src, attention_mask=(batch.src != PAD_ID).long(),
                           decoder_input_ids=batch.tgt_in).logits
            return F.cross_entropy(logits.flatten(0, 1).float(), batch.tgt_out.flatten(), ignore_index=PAD_ID,
                                   label_smoothing=eps, reduction="sum")
    model.train()
    # fused AdamW for both: mt trains with it on CPU (mt.device.fused_adam), and it is the default of
    # HF's Trainer with torch >= 2.8 (optim="adamw_torch_fused")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=cfg.train.betas, eps=cfg.train.adam_eps,
                                  fused=True)
    context = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if precision == "bf16" else None

    def step(batch: Batch) -> None:
        if context is None:
            loss = loss_of(batch)
        else:
            with context():
                loss = loss_of(batch)
        (loss / batch.num_tgt_tokens).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    timed = batches[warmup: warmup + steps]
    for batch in batches[:warmup] + timed:  # the timed batches' shapes met once, as in a run's later epochs
        step(batch)
    tokens = sum(b.num_tgt_tokens for b in timed)
    rates = []
    for _ in range(repeats):
        start = time.perf_counter()
        for batch in timed:
            step(batch)
        rates.append(tokens / (time.perf_counter() - start))
    flops = sum(step_flops(cfg.model, vocab, b.src, b.tgt_out) for b in timed)
    return {"tokens_per_s": rates, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "tokens": tokens, "steps": len(timed), "flops": flops}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(ROOT / "configs/multi30k_de_en.yaml"))
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--max-tokens", default="",
                        help="comma-separated batch token budgets to measure (default: the config's train.max_tokens)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--precisions", default="fp32,bf16")
    parser.add_argument("--out", default=str(ROOT / "benchmarks/speed_train.md"))
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--precision", help=argparse.SUPPRESS)
    parser.add_argument("--batches", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.precision, args.batches, args.warmup, args.steps, args.repeats,
                                args.threads)))
        return

    from mt.device import slow_bf16_warning

    precisions, notes = args.precisions.split(","), []
    if "bf16" in precisions and slow_bf16_warning(torch.device("cpu")):
        precisions.remove("bf16")  # emulated bf16 would take hours and say nothing about either engine
        notes.append("bf16 not measured: this CPU has no native bf16 instructions (emulated bf16 matmuls "
                     "run ~100x slower than fp32 for both engines).")
    if not precisions:
        sys.exit("bench_train.py: nothing to measure: " + " ".join(notes))
    budgets = [int(b) for b in args.max_tokens.split(",") if b] or [load_config(args.config).train.max_tokens]
    ceilings = {p: matmul_ceiling(p, args.threads) for p in precisions}
    from mt.linear import fp32_gemm

    library = fp32_gemm()[0]
    print("matmul ceiling: " + ", ".join(f"{p} {c:.0f} GFLOP/s" for p, c in ceilings.items()), flush=True)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for budget in budgets:
            batches = prepare_batches(args.config, args.warmup + args.steps, Path(tmp), budget)
            # every (engine, precision) pass of this budget in one rotation, so that mt's bf16 / fp32
            # ratio is measured side by side too, not only mt / HF
            passes = [(engine, precision) for precision in precisions
                      for engine in ["mt", "hf"] + (["mt-mkl"] if precision == "fp32" and library != "mkl" else [])]
            result = {p: [] for p in passes}
            for r in range(args.repeats):  # one process per pass, the order rotating
                for engine, precision in passes[r % len(passes):] + passes[: r % len(passes)]:
                    cmd = [sys.executable, __file__, "--worker", engine, "--precision", precision, "--batches",
                           str(batches), "--steps", str(args.steps), "--warmup", str(args.warmup),
                           "--repeats", "1", "--threads", str(args.threads)]
                    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
                    result[engine, precision].append(json.loads(out.strip().splitlines()[-1]))
                    print(f"{budget} {precision} pass {r + 1} {engine}: "
                          f"{result[engine, precision][-1]['tokens_per_s'][0]:.0f} target tokens/s", flush=True)
            for precision in precisions:
                rows.append((budget, precision, {e: v for (e, p), v in result.items() if p == precision}))
    table = [
        "# Training speed: mt vs Hugging Face transformers (M2M100), same shape, batches and precision",
        "",
        f"Command: `python scripts/bench_train.py --config {os.path.relpath(Path(args.config).resolve(), ROOT)} --steps {args.steps} "
        f"--repeats {args.repeats}" + (f" --max-tokens {args.max_tokens}" if args.max_tokens else "") + "`  ",
        f"Machine: {cpu()}; {args.threads} threads, torch {torch.__version__}. Matmul ceiling (best GEMM of "
        "this run; fp32: the better of MKL and oneDNN): " + ", ".join(f"{p} {c:.0f} GFLOP/s" for p, c in ceilings.items()) + ". "
        f"A step is forward + label-smoothed CE + backward + clip + AdamW on the same token-bucketed Multi30k "
        f"batches ({args.steps} batches of each budget, after {args.warmup} warm-up batches and an untimed pass over "
        "the same batches, so that oneDNN's kernels for their shapes exist, as in a training run after its first "
        "epoch); median of "
        f"{args.repeats} passes, each a process of its own, the passes of every engine and precision of a budget "
        "alternating. bf16 is autocast (weights and fused AdamW in fp32, for both engines: HF's Trainer's default). Share of ceiling: the step's matmul FLOPs per second (from the model shape and the "
        "padded batch sizes) over the ceiling of that precision. mt's worker keeps freed memory for reuse, as "
        "every mt command does (mt/allocator.py); HF's runs with the C allocator's defaults. "
        f"mt's fp32 products here: {library} (mt/linear.py); HF's: MKL (PyTorch's default)."
        + "".join(f" {n}" for n in notes),
        "",
        "| batch budget (tokens) | target tokens | precision | mt tokens/s | HF tokens/s | mt / HF | "
        "mt / mt fp32 | mt through MKL tokens/s | mt share of ceiling | HF share of ceiling | mt peak RSS (MB) | "
        "HF peak RSS (MB) |",
        "|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    median = {(b, p): {e: statistics.median(x["tokens_per_s"][0] for x in r[e]) for e in r} for b, p, r in rows}
    for budget, precision, result in rows:
        rate = dict(median[budget, precision])
        own = f"{rate['mt'] / median[budget, 'fp32']['mt']:.2f}x" if (budget, "fp32") in median else "-"
        mkl = f"{rate.pop('mt-mkl'):.0f}" if "mt-mkl" in rate else "-"
        first = result["mt"][0]
        share = {e: rate[e] * first["flops"] / first["tokens"] / 1e9 / ceilings[precision] for e in rate}
        rss = {e: max(p["peak_rss_mb"] for p in result[e]) for e in rate}
        table.append(f"| {budget} | {first['tokens']} | {precision} | {rate['mt']:.0f} | {rate['hf']:.0f} | "
                     f"{rate['mt'] / rate['hf']:.2f}x | {own} | {mkl} | {share['mt']:.0%} | {share['hf']:.0%} | {rss['mt']:.0f} | "
                     f"{rss['hf']:.0f} |")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(table) + "\n", encoding="utf-8")
    print("\n".join(table))


if __name__ == "__main__":
    main()
