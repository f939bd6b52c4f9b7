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

from mt.config import Config
from mt.linear import prepack
from mt.progress import bar
from mt.run import Run
from mt.translate import validation_bleu


def choose_defaults(cfg: Config, run: Run, valid_src: list[str], valid_ref: list[str], device: str,
                    log: Callable[[str], None], progress: bool | None = None) -> dict:
    """Pick checkpoint, beam and length penalty by validation BLEU; write and return them. Models are
    read as ``mt translate`` reads them (``Run.load_for_inference``, the run's ``decode.dtype``) on
    ``device``."""
    t0 = time.time()
    decode = cfg.decode
    candidates = {"best": "best"}
    n, found = cfg.train.average_last, len(run.step_checkpoints())
    if n >= 2 and found >= n:
        run.average_last(n)
        candidates["average"] = "average"
    elif n >= 2:
        log(f"not averaging: train.average_last={n} but the run kept {found} step checkpoints")
    if decode.dtype == "int8":  # CPU kernels: where mt translate (--device auto) runs them
        device = "auto"
    loaded = {name: run.load_for_inference(which, decode.dtype, device) for name, which in candidates.items()}
    for m in loaded.values():
        prepack(m.model)  # as mt translate will decode
    tried = []
    grid, seen_greedy = [], decode.beam == 1
    for beam, lenpen in itertools.product(decode.tune_beam or [decode.beam], decode.tune_lenpen or [decode.lenpen]):
        if beam == 1:  # greedy: the length penalty changes scores, never the output
            if seen_greedy:
                continue
            seen_greedy = True
        if (beam, lenpen) != (decode.beam, decode.lenpen):
            grid.append((beam, lenpen))
    shown = bar(progress, total=len(loaded) + len(grid), desc="choosing decoding defaults on validation",
                unit=" trials", leave=False)

    def score(name: str, beam: int, lenpen: float) -> float:
        m = loaded[name]
        bleu = validation_bleu(m.model, valid_src, valid_ref, m.src_tok, m.tgt_tok,
                               replace(decode, beam=beam, lenpen=lenpen), cfg.data.tgt_lang)
        tried.append({"checkpoint": name, "beam": beam, "lenpen": lenpen, "bleu": round(bleu, 2)})
        shown.set_postfix_str(f"{name}, beam {beam}, lenpen {lenpen}: BLEU {bleu:.2f}")
        shown.update(1)
        return bleu

    with shown:
        by_checkpoint = {name: score(name, decode.beam, decode.lenpen) for name in loaded}
        chosen = max(by_checkpoint, key=lambda name: (by_checkpoint[name], name == "average"))
        best = (by_checkpoint[chosen], decode.beam, decode.lenpen)
        for beam, lenpen in grid:
            bleu = score(chosen, beam, lenpen)
            if bleu > best[0]:
                best = (bleu, beam, lenpen)
    defaults = {"checkpoint": chosen, "beam": best[1], "lenpen": best[2], "valid_bleu": round(best[0], 2),
                "tried": tried}
    path = run.write_defaults(defaults)
    log(f"decoding defaults chosen on validation in {time.time() - t0:.0f}s: checkpoint {chosen}, beam {best[1]}, "
        f"lenpen {best[2]} (valid BLEU {best[0]:.2f}; " + ", ".join(
            f"{name} {value:.2f}" for name, value in by_checkpoint.items()) + f") -> {path}")
    return defaults
