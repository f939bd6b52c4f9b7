"""Pictures: attention heatmaps (``mt attention``) and learning curves (``mt plot``), drawn with
matplotlib, the optional extra ``pip install 'mt[plot]'``. Files are written whole or not at all."""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from mt.errors import MtError
from mt.files import atomic_write

if TYPE_CHECKING:  # mt plot needs no torch
    from mt.attention import Maps

NAMES = {"cross": "cross-attention", "self-enc": "encoder self-attention", "self-dec": "decoder self-attention"}
STACKS = {"cross": "decoder", "self-enc": "encoder", "self-dec": "decoder"}
CELL = 0.17  # inches per piece: 40+ labels stay readable at FONT points
FONT = 7


class PlotError(MtError):
    """A picture that cannot be drawn (matplotlib missing, nothing to plot)."""


def pyplot():
    """matplotlib's pyplot on a file-only backend, or a PlotError saying what to install."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise PlotError("pictures need matplotlib: pip install 'mt[plot]' (or pip install matplotlib)") from None
    return plt


def _save(fig, out: Path) -> None:
    """Write ``fig`` in the format the suffix names; a PNG in 256 colours (a third of the bytes)."""
    fmt = out.suffix.lstrip(".").lower() or "png"
    buffer = io.BytesIO()
    try:
        fig.savefig(buffer, format=fmt, dpi=110, bbox_inches="tight")
    except ValueError as e:  # an unknown format
        raise PlotError(f"{out}: {e}") from None
    finally:
        pyplot().close(fig)
    data = buffer.getvalue()
    if fmt == "png":
        from PIL import Image  # matplotlib's own dependency

        small = io.BytesIO()
        Image.open(io.BytesIO(data)).convert("RGB").quantize(256).save(small, format="png", optimize=True)
        data = small.getvalue()
    with atomic_write(out, "wb") as f:
        f.write(data)


def attention_figure(maps: Maps, out: Path, *, heads: bool = False, layers: Sequence[int] | None = None,
                     title: str = "") -> None:
    """Heatmaps of ``maps`` (rows: query pieces, columns: key pieces), one panel per layer with the
    heads averaged, or with ``heads`` a grid of layers x heads; ``layers`` picks layers (0-based)."""
    plt = pyplot()
    chosen = list(range(len(maps.layers))) if layers is None else list(layers)
    panels = [(i, None) for i in chosen] if not heads else [(i, h) for i in chosen for h in range(maps.layers[i].shape[0])]
    columns = maps.layers[0].shape[0] if heads else min(len(panels), 3)
    grid_rows = math.ceil(len(panels) / columns)
    width = max(2.5, CELL * len(maps.columns) + 1.4)
    height = max(2.5, CELL * len(maps.rows) + 1.4)
    fig, axes = plt.subplots(grid_rows, columns, figsize=(width * columns, height * grid_rows), squeeze=False)
    for ax in axes.flat[len(panels):]:
        ax.axis("off")
    for ax, (layer, head) in zip(axes.flat, panels):
        weights = maps.layers[layer]
        shown = weights.mean(0) if head is None else weights[head]  # (rows, columns)
        image = ax.imshow(shown.numpy(), cmap="Blues", vmin=0.0, vmax=1.0, aspect="equal", interpolation="nearest")
        ax.set_xticks(range(len(maps.columns)), maps.columns, rotation=90, fontsize=FONT)
        ax.set_yticks(range(len(maps.rows)), maps.rows, fontsize=FONT)
        ax.tick_params(length=0)
        which = "heads averaged" if head is None else f"head {head + 1}"
        ax.set_title(f"{STACKS[maps.kind]} layer {layer + 1} ({which})", fontsize=FONT + 1)
    fig.colorbar(image, ax=axes.ravel().tolist(), shrink=0.6, label="attention weight")
    fig.suptitle(title or NAMES[maps.kind], fontsize=FONT + 3)
    _save(fig, out)


CURVES = (("loss", "loss (label-smoothed, per token)"), ("bleu", "validation BLEU"), ("lr", "learning rate"))


def curves_figure(runs: Sequence[tuple[str, list[dict]]], out: Path) -> list[str]:
    """Training and validation loss, validation BLEU and learning rate of each run (name, its
    metrics.jsonl rows) against updates (left) and training time (right), runs overlaid. Returns
    warnings (runs whose rows carry no training time)."""
    plt = pyplot()
    if not any(rows for _, rows in runs):
        raise PlotError("no rows to plot: the runs' metrics.jsonl files are empty")
    fig, axes = plt.subplots(len(CURVES), 2, figsize=(11, 3.0 * len(CURVES)), squeeze=False, sharex="col")
    warnings = []
    longest = max((r.get("elapsed", 0.0) for _, rows in runs for r in rows), default=0.0)
    hours = longest > 3 * 3600
    for n, (name, rows) in enumerate(runs):
        color = f"C{n % 10}"
        timed = all("elapsed" in r for r in rows if r.get("kind") in ("train", "valid"))
        if not timed:
            warnings.append(f"{name}: its metrics.jsonl has no training times (written by an older mt): "
                            "plotted against updates only")
        for kind, style in (("train", "-"), ("valid", "o--")):
            for row_n, (key, _) in enumerate(CURVES):
                points = [r for r in rows if r.get("kind") == kind and isinstance(r.get(key), (int, float))]
                if not points:
                    continue
                label = f"{name} ({kind})"
                ys = [r[key] for r in points]
                axes[row_n][0].plot([r["step"] for r in points], ys, style, color=color, label=label, markersize=3)
                if timed:
                    xs = [r["elapsed"] / (3600 if hours else 60) for r in points]
                    axes[row_n][1].plot(xs, ys, style, color=color, label=label, markersize=3)
    for row_n, (key, title) in enumerate(CURVES):
        for col in (0, 1):
            ax = axes[row_n][col]
            ax.set_ylabel(title)
            ax.grid(alpha=0.3)
            if key == "loss" and ax.lines:
                low = min(min(line.get_ydata()) for line in ax.lines)
                ax.set_ylim(bottom=max(0.0, low - 0.5), top=low + 4.0)  # the first steps' loss would flatten the rest
    axes[-1][0].set_xlabel("updates")
    axes[-1][1].set_xlabel(f"training time ({'hours' if hours else 'minutes'})")
    handles, labels = axes[0][0].get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="upper center", ncol=min(len(labels), 4), fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0, 1, 0.95))
    _save(fig, out)
    return warnings
