"""What ``mt translate -m RUN`` uses by default, chosen on the validation split only (never on test).

After training, ``choose_defaults``

1. averages the weights of the last ``train.average_last`` step checkpoints into
   ``checkpoints/average.pt`` (checkpoint averaging as in Vaswani et al., 2017) and keeps whichever of
   it and ``best.pt`` translates the validation split with the higher BLEU;
2. with that checkpoint, tries every beam size in ``decode.tune_beam`` and length penalty in
   ``decode.tune_lenpen`` and keeps the pair with the highest validation BLEU;
3. writes the choice, with every score it saw, to ``RUN/decode.yaml``.

``mt translate`` and ``mt eval`` read ``decode.yaml`` for their defaults (checkpoint, beam, length
penalty); options given on the command line still win.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import torch
import yaml

from mt import checkpoint as ckpt
from mt.config import Config
from mt.data import ParallelData
from mt.int8 import quantize_int8
from mt.model import Transformer
from mt.tokenizer import Tokenizer

DEFAULTS_FILE = "decode.yaml"
_KEYS = {"checkpoint": str, "beam": int, "lenpen": float}


def read_defaults(run_dir: str | Path) -> dict:
    """The run's tuned decoding defaults ({} when it has none): checkpoint, beam, lenpen."""
    path = Path(run_dir) / DEFAULTS_FILE
    if not path.exists():
        return {}
    try:
        tree = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        raise ckpt.CheckpointError(f"{path}: invalid YAML ({getattr(e, 'problem', e)})") from None
    if not isinstance(tree, dict):
        raise ckpt.CheckpointError(f"{path}: expected a mapping with checkpoint, beam and lenpen")
    chosen = {}
    for key, kind in _KEYS.items():
        if key not in tree:
            continue
        value = tree[key]
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if key == "checkpoint" and isinstance(value, int) and not isinstance(value, bool):
            value = str(value)  # a step number
        if not isinstance(value, kind) or isinstance(value, bool):
            raise ckpt.CheckpointError(f"{path}: {key}: expected {kind.__name__}, got {value!r}")
        chosen[key] = value
    return chosen


def average_last(run_dir: str | Path, n: int, out: str | Path | None = None) -> Path:
    """Average the last ``n`` step checkpoints of a run into ``out`` (default checkpoints/average.pt)."""
    ckpt_dir = Path(run_dir) / "checkpoints"
    found = ckpt.step_checkpoints(ckpt_dir)
    if n < 2 or len(found) < n:
        raise ckpt.CheckpointError(f"{ckpt_dir}: averaging the last {n} needs at least {max(2, n)} step "
                                   f"checkpoints, found {len(found)}")
    return average_checkpoints([p for _, p in found[-n:]], out or ckpt_dir / "average.pt")


def average_best(run_dir: str | Path, n: int, metric: str, out: str | Path | None = None) -> Path:
    """Average the ``n`` step checkpoints with the best validation ``metric`` (bleu: highest, nll: lowest)."""
    ckpt_dir = Path(run_dir) / "checkpoints"
    scored = []
    for step, path in ckpt.step_checkpoints(ckpt_dir):
        valid = ckpt.load(path).get("valid") or {}
        if metric in valid:
            scored.append((valid[metric], step, path))
    if n < 2 or len(scored) < n:
        raise ckpt.CheckpointError(f"{ckpt_dir}: averaging the {n} best by validation {metric} needs at least "
                                   f"{max(2, n)} validated step checkpoints, found {len(scored)}")
    scored.sort(key=lambda item: (-item[0] if metric == "bleu" else item[0], -item[1]))
    chosen = sorted(scored[:n], key=lambda item: item[1])  # in step order
    return average_checkpoints([p for _, _, p in chosen], out or ckpt_dir / "average.pt")


def average_checkpoints(paths: list[Path], out: str | Path) -> Path:
    state = ckpt.average(paths)
    state["averaged"] = [p.name for p in paths]
    state.pop("optimizer", None)  # an average is for translating, not for resuming
    return ckpt.atomic_save(state, out)


def choose_defaults(cfg: Config, run_dir: Path, valid: ParallelData, src_tok: Tokenizer, tgt_tok: Tokenizer,
                    device: torch.device, log: Callable[[str], None]) -> dict:
    """Pick checkpoint, beam and length penalty by validation BLEU; write and return them."""
    from mt.train import validation_bleu

    t0 = time.time()
    decode = cfg.decode
    candidates = {"best": ckpt.resolve(run_dir, "best")}
    n, found = cfg.train.average_last, len(ckpt.step_checkpoints(run_dir / "checkpoints"))
    if n >= 2 and found >= n:
        candidates["average"] = average_last(run_dir, n)
    elif n >= 2:
        log(f"not averaging: train.average_last={n} but the run kept {found} step checkpoints")
    models = {}
    for name, path in candidates.items():
        state = ckpt.load(path)
        model = Transformer(cfg.model, src_tok.vocab_size, tgt_tok.vocab_size, joint=cfg.tokenizer.joint)
        model.load_state_dict(state["model"])
        model.to(device).eval()
        if decode.dtype == "bf16":  # score what mt translate will run
            model.to(torch.bfloat16)
        elif decode.dtype == "int8":  # on the CPU, like mt translate
            quantize_int8(model.cpu())
        models[name] = model
    tried = []

    def score(name: str, beam: int, lenpen: float) -> float:
        bleu = validation_bleu(models[name], valid, src_tok, tgt_tok, replace(decode, beam=beam, lenpen=lenpen))
        tried.append({"checkpoint": name, "beam": beam, "lenpen": lenpen, "bleu": round(bleu, 2)})
        return bleu

    by_checkpoint = {name: score(name, decode.beam, decode.lenpen) for name in models}
    chosen = max(by_checkpoint, key=lambda name: (by_checkpoint[name], name == "average"))
    best = (by_checkpoint[chosen], decode.beam, decode.lenpen)
    seen_greedy = decode.beam == 1
    for beam, lenpen in itertools.product(decode.tune_beam or [decode.beam], decode.tune_lenpen or [decode.lenpen]):
        if beam == 1:  # greedy: the length penalty changes scores, never the output
            if seen_greedy:
                continue
            seen_greedy = True
        if (beam, lenpen) != (decode.beam, decode.lenpen):
            bleu = score(chosen, beam, lenpen)
            if bleu > best[0]:
                best = (bleu, beam, lenpen)
    defaults = {"checkpoint": chosen, "beam": best[1], "lenpen": best[2], "valid_bleu": round(best[0], 2),
                "tried": tried}
    path = run_dir / DEFAULTS_FILE
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("# chosen on the validation split by mt train; mt translate and mt eval use these defaults\n"
                   + yaml.safe_dump(defaults, sort_keys=False), encoding="utf-8")
    tmp.replace(path)
    log(f"decoding defaults chosen on validation in {time.time() - t0:.0f}s: checkpoint {chosen}, beam {best[1]}, "
        f"lenpen {best[2]} (valid BLEU {best[0]:.2f}; " + ", ".join(
            f"{name} {value:.2f}" for name, value in by_checkpoint.items()) + f") -> {path}")
    return defaults
