"""``mt info``: what a run directory holds (model, vocabulary, progress, best scores, decoding defaults,
corpora) and what this machine can run it with (CUDA, native bf16, int8), read through ``mt.run``."""

from __future__ import annotations

import math
from pathlib import Path

import torch

from mt import checkpoint as ckpt
from mt.device import choose_dtype, choose_precision, pick_device, slow_bf16_warning
from mt.linear import fp32_gemm
from mt.int8 import unavailable as int8_unavailable
from mt.model import Transformer
from mt.run import Run, RunError


def machine() -> dict:
    """CUDA devices (with bf16 support), native bf16 on this CPU, its fp32 GEMM library, int8 decoding."""
    cuda = [{"name": torch.cuda.get_device_name(i), "bf16": torch.cuda.get_device_capability(i) >= (8, 0)}
            for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []  # bf16: Ampere on
    int8 = int8_unavailable()
    device = pick_device("auto")
    return {"torch": torch.__version__, "threads": torch.get_num_threads(), "cuda": cuda,
            "cpu_bf16": not slow_bf16_warning(torch.device("cpu")), "fp32_gemm": fp32_gemm()[0], "int8": not int8,
            **({"int8_problem": int8} if int8 else {}),
            "auto": {"train": choose_precision("auto", device)[0],
                     "translate": choose_dtype("auto", device, int8_missing=int8 if device.type == "cpu" else "")[0]}}


def describe(run_dir: str | Path) -> dict:
    """The facts ``mt info`` prints, as plain data."""
    run = Run(run_dir)
    if not run.config_path.is_file():
        raise RunError(f"{run.path}: no {Run.CONFIG}: not a run directory written by mt train")
    cfg = run.load_config()
    src_tok, tgt_tok = run.tokenizers(cfg)
    with torch.device("meta"):  # shapes only: nothing allocated, whatever the model's size
        model = Transformer(cfg.model, src_tok.vocab_size, tgt_tok.vocab_size, joint=cfg.tokenizer.joint)
    m = cfg.model
    info = {
        "run": str(run.path),
        "model": {"parameters": model.num_parameters(), "encoder_layers": m.encoder_layers,
                  "decoder_layers": m.decoder_layers, "d_model": m.d_model, "heads": m.n_heads,
                  "ffn_dim": m.ffn_dim, "norm": m.norm},
        "vocabulary": {"joint": cfg.tokenizer.joint, "type": cfg.tokenizer.type,
                       "src": src_tok.vocab_size, "tgt": tgt_tok.vocab_size,
                       "files": sorted({str(p) for p in run.tokenizer_paths(cfg.tokenizer.joint)})},
        "data": {"src_lang": cfg.data.src_lang, "tgt_lang": cfg.data.tgt_lang,
                 "train": [{"src": c.src, "tgt": c.tgt, "weight": c.weight} for c in cfg.data.train],
                 "valid": {"src": cfg.data.valid.src, "tgt": cfg.data.valid.tgt} if cfg.data.valid.is_set else None},
        "training": {"precision": cfg.train.precision, "max_tokens": cfg.train.max_tokens},
        "decoding": {"beam": cfg.decode.beam, "lenpen": cfg.decode.lenpen, "dtype": cfg.decode.dtype,
                     **run.read_defaults()},
        "machine": machine(),
    }
    last = run.checkpoint_path("last")
    regime = None
    if last.is_file():
        state = ckpt.load(last, mmap=True)
        trainer, regime = state.get("trainer", {}), state.get("regime")
        info["training"].update(steps=trainer.get("step", 0), epoch=trainer.get("epoch", 0) + 1,
                                seconds=round(trainer.get("elapsed", 0.0), 1))
    else:
        info["training"]["steps"] = 0
    rows = run.metrics_rows()
    probes = [r for r in rows if r.get("kind") == "regime"]
    if isinstance(regime, dict) and probes:  # train.regimes: what the run chose, from what pace
        info["regime"] = {"index": regime.get("index", -1), "set": regime.get("set", []),
                          **{k: probes[-1].get(k) for k in ("epochs", "seconds_per_update", "updates_per_epoch")}}
    valid = [r for r in rows if r.get("kind") == "valid"]
    best = {}
    for key, better in (("bleu", max), ("nll", min)):
        scored = [r for r in valid if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]
        if scored:
            row = better(scored, key=lambda r: r[key])
            best[key] = {"value": row[key], "step": row["step"]}
    info["best"] = best
    return info


def format_info(info: dict) -> str:
    """``describe``'s facts as aligned lines for people."""
    m, v, t, d = info["model"], info["vocabulary"], info["training"], info["decoding"]
    lines = [("run", info["run"]),
             ("model", f"{m['parameters']:,} parameters; {m['encoder_layers']}+{m['decoder_layers']} layers, "
                       f"d_model {m['d_model']}, {m['heads']} heads, ffn {m['ffn_dim']}, {m['norm']}-norm"),
             ("vocabulary", (f"joint {v['type']}, {v['src']:,} pieces" if v["joint"] else
                             f"{v['type']}, source {v['src']:,} / target {v['tgt']:,} pieces") + f" ({', '.join(v['files'])})")]
    data = info["data"]
    for n, corpus in enumerate(data["train"]):
        weight = f" (weight {corpus['weight']:g})" if len(data["train"]) > 1 else ""
        lines.append(("train corpus" if n == 0 else "", f"{data['src_lang']}: {corpus['src']}  "
                      f"{data['tgt_lang']}: {corpus['tgt']}{weight}"))
    if data["valid"]:
        lines.append(("valid corpus", f"{data['src_lang']}: {data['valid']['src']}  {data['tgt_lang']}: {data['valid']['tgt']}"))
    done = f"{t['steps']:,} updates" if t.get("steps") else "not trained yet"
    if t.get("steps"):
        done += f" (in epoch {t['epoch']}), {t['seconds'] / 60:.1f} min"
    lines.append(("training", f"{done} ({t['precision']}, {t['max_tokens']:,}-token batches)"))
    r = info.get("regime")
    if r:
        pace = f"{r['seconds_per_update']:.3f} s per update in the probe, " if r["seconds_per_update"] else ""
        lines.append(("regime", (f"{r['index'] + 1}: {', '.join(r['set'])}" if r["index"] >= 0 else "the base settings")
                      + f" ({pace}{r['epochs']:.1f} epochs in the budget)"))
    best = info["best"]
    if best:
        lines.append(("best valid", ", ".join(f"{k.upper() if k == 'bleu' else k} {b['value']:.2f} (step {b['step']})"
                                              for k, b in best.items())))
    chosen = ", ".join(f"{k} {d[k]}" for k in ("checkpoint", "beam", "lenpen", "dtype") if k in d)
    lines.append(("decoding", chosen + (" (chosen on validation)" if "checkpoint" in d else " (the config's)")))
    mc = info["machine"]
    cuda = ", ".join(f"{g['name']}{' (bf16)' if g['bf16'] else ''}" for g in mc["cuda"]) or "none"
    lines.append(("this machine", f"torch {mc['torch']}, threads {mc['threads']}; CUDA: {cuda}; "
                                  f"CPU bf16: {'native' if mc['cpu_bf16'] else 'emulated (slow)'}; "
                                  f"fp32 GEMM: {mc['fp32_gemm']}; "
                                  f"int8: {'yes' if mc['int8'] else 'no'}; auto means: training "
                                  f"{mc['auto']['train']}, translating {mc['auto']['translate']}"))
    width = max(len(k) for k, _ in lines)
    return "\n".join(f"{k:<{width}}  {value}" for k, value in lines)
