"""Settings chosen from the machine's measured speed (``train.regimes``).

A recipe with a time budget is tuned for the number of epochs that budget buys, and that number
follows the hardware: in the same 40 minutes an AVX512-BF16 CPU in bf16 makes about twice the
updates of an AVX2 one in fp32, and the settings that suit 10 epochs gain nothing from 21 (their
validation NLL rising), while those that pay over 39 (more dropout, larger batches) fall short over
12 (``benchmarks/recipe_budget.md``). So a recipe may list regimes, each a few settings for a
budget of at least ``min_epochs`` epochs. Before training,
``mt train`` times ``train.probe_steps`` updates at the base settings, on the run's own batches,
device, precision and processes; from that pace it works out the epochs the budget affords
(``max_time``, capped by ``max_steps`` and ``max_epochs``) and applies the regime with the largest
``min_epochs`` within them. The probe's model is thrown away, so the run that follows is the one its
settings give; its seconds count against ``max_time``. The choice is logged, written into the run's
``config.yaml`` (whose ``regimes`` are then empty: nothing is left to choose) and into every
checkpoint (``regime``: its index and settings), and kept on resume.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch

from mt.config import Config, config_from_dict, parse_duration, parse_override
from mt.device import autocast, fused_adam
from mt.distributed import Dist
from mt.loss import batch_loss
from mt.model import Transformer
from mt.prepare import Prepared

UNTIMED_UPDATES = 3  # the first updates allocate and warm the caches: not the pace of the run
# The timed updates are made twice, timed the second time: oneDNN (bf16 products on a CPU) builds a
# kernel for each new matrix shape on first use, and a run meets its few batch shapes again epoch after
# epoch. On a Xeon with AMX a first pass ran bf16 at 0.277 s per 2,048-token update, ~25% slower than
# the run then trained.


@dataclass
class Budget:
    """What the budget affords at the base settings."""

    epochs: float
    seconds_per_update: float  # measured by the probe (0: no probe, the budget is counted in updates)
    probe_seconds: float  # the probe's wall time, untimed updates included
    updates_per_epoch: float

    def __str__(self) -> str:
        pace = (f"{self.seconds_per_update:.3f} s per update over the probe's updates ({self.probe_seconds:.0f} s), "
                if self.seconds_per_update else "")
        return f"{pace}{self.updates_per_epoch:.0f} updates per epoch: the budget affords {self.epochs:.1f} epochs"


def updates_per_epoch(cfg: Config, data: Prepared, d: Dist) -> float:
    """Updates in an epoch at ``cfg``'s batch size, on ``d.world`` processes."""
    batches = len(data.train.sampler(cfg.train.max_tokens, shuffle=False).batches(0))
    return batches / (cfg.train.accum_steps * d.world)


def time_updates(cfg: Config, data: Prepared, device: torch.device, d: Dist) -> tuple[float, float]:
    """Seconds per update at ``cfg``'s settings (the slowest rank's), and the probe's wall time.

    Each rank trains a model of its own (no gradient all-reduce) on its share of the first updates of
    epoch 1: forward, backward, clipping and the optimizer step, as in training; the timed updates
    (those after ``UNTIMED_UPDATES``) are made once untimed, then timed."""
    tc = cfg.train
    started = time.time()
    model = Transformer(cfg.model, data.src_tok.vocab_size, data.tgt_tok.vocab_size, joint=cfg.tokenizer.joint).to(device)
    model.train()
    optimizer_cls = torch.optim.AdamW if tc.optimizer == "adamw" else torch.optim.Adam
    optimizer = optimizer_cls(model.parameters(), lr=tc.lr / max(tc.warmup_steps, 1), betas=tc.betas,
                              eps=tc.adam_eps, weight_decay=tc.weight_decay, fused=fused_adam(device))
    batches = data.train.sampler(tc.max_tokens, shuffle=True, seed=tc.seed).batches(0)
    per_update = tc.accum_steps * d.world
    updates = min(UNTIMED_UPDATES + tc.probe_steps, len(batches) // per_update)
    timed_from, timed = time.time(), 0
    order = list(range(updates)) + list(range(UNTIMED_UPDATES, updates))  # the timed ones a second time
    for step, u in enumerate(order):
        if step == updates:
            _synchronize(device)
            timed_from = time.time()
        first = u * per_update + d.rank * tc.accum_steps
        for i in range(first, first + tc.accum_steps):
            batch = data.train.batch(batches[i], 0).to(device)  # epoch 1's, sampled as training will
            with autocast(device, tc.precision):
                loss, _ = batch_loss(model, batch, tc.label_smoothing)
            (loss / max(batch.num_tgt_tokens, 1)).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), tc.clip_norm or float("inf"))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        timed += step >= updates
    _synchronize(device)
    now = time.time()
    per_update_s = (now - timed_from) / timed if timed else (now - started) / max(updates, 1)
    slowest, wall = d.max([per_update_s, now - started])
    return slowest, wall


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def afforded(cfg: Config, data: Prepared, device: torch.device, d: Dist) -> Budget:
    """The epochs the budget affords at ``cfg``'s (base) settings; probes the speed when the budget
    is a time."""
    tc = cfg.train
    per_epoch = updates_per_epoch(cfg, data, d)
    seconds_per_update = probe = 0.0
    updates = math.inf
    if tc.max_time:
        seconds_per_update, probe = time_updates(cfg, data, device, d)
        updates = max(parse_duration(tc.max_time) - probe, 0.0) / max(seconds_per_update, 1e-9)
    if tc.max_steps:
        updates = min(updates, tc.max_steps)
    epochs = min(updates / max(per_epoch, 1e-9), tc.max_epochs or math.inf)
    return Budget(epochs=epochs, seconds_per_update=seconds_per_update, probe_seconds=probe, updates_per_epoch=per_epoch)


def choose(cfg: Config, epochs: float) -> int:
    """The index of the regime that ``epochs`` qualifies for (largest ``min_epochs``), or -1."""
    fits = [(r.min_epochs, i) for i, r in enumerate(cfg.train.regimes) if epochs >= r.min_epochs]
    return max(fits)[1] if fits else -1


def adapt(cfg: Config, data: Prepared, device: torch.device, d: Dist) -> tuple[Config, Budget, dict, str]:
    """``cfg`` with the regime its budget affords applied (and no regimes left), that budget, the
    record checkpoints keep of the choice (``index``, -1 for the base settings, and ``set``) and a
    line that says so. Every rank calls it and takes the same decision (the probe's pace is the
    slowest rank's)."""
    budget = afforded(cfg, data, device, d)
    chosen = choose(cfg, budget.epochs)
    if chosen < 0:
        lowest = min(r.min_epochs for r in cfg.train.regimes)
        return (cfg.with_settings([]), budget, {"index": -1, "set": []},
                f"regime: the base settings ({budget}; regimes start at {lowest:g})")
    regime = cfg.train.regimes[chosen]
    settings = ", ".join(regime.set) or "the base settings"
    return (cfg.with_settings(regime.set), budget, {"index": chosen, "set": list(regime.set)},
            f"regime {chosen + 1} of {len(cfg.train.regimes)} (min_epochs {regime.min_epochs:g}): {settings} ({budget})")


def as_started(cfg: Config, saved: Config, regime: dict | None) -> tuple[Config, list[str]]:
    """For a resumed run: ``cfg`` with the choice the run made when it started, and what that kept.
    ``saved`` is the checkpoint's config, ``regime`` its record of the settings applied (absent
    from runs without regimes). Every key that the run applied or that ``cfg``'s regimes name takes
    the run's value, and no regimes are left to choose from."""
    applied = list(regime.get("set", [])) if isinstance(regime, dict) else []
    named = applied + [text for r in cfg.train.regimes for text in r.set]
    if not named:
        return cfg, []
    tree, before = cfg.to_dict(), saved.to_dict()
    kept = []
    for section, key in dict.fromkeys(tuple(parse_override(text)[0]) for text in named):
        if tree[section][key] != before[section][key]:
            kept.append(f"{section}.{key}={before[section][key]!r} (this config: {tree[section][key]!r})")
        tree[section][key] = before[section][key]
    tree["train"]["regimes"] = []
    return config_from_dict(tree), kept
