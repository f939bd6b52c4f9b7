"""Alignment error rate of mt's cross-attention alignments on the hand-annotated gold set.

    python scripts/eval_align.py -m runs/multi30k_de_en [--data data/multi30k] [--out benchmarks/alignment.md]

Forces each reference translation of the gold sentences (tests/data/gold_align_de_en.txt, Multi30k
test_2016_flickr lines 1-50) through the model and aligns it, every decoder layer with the heads
averaged, and each head of each layer alone; prints AER (Och & Ney 2003: 1 - (|A∩S| + |A∩P|) / (|A| + |S|),
S the sure links, P sure and possible), precision and recall, over all 50 sentences and over each half
(the choice is made on all 50, so each half shows how stable it is). ``mt translate --align``
averages all layers and heads (``mt.attention.align``), the best choice that does not depend on one
model's heads.
"""

from __future__ import annotations

import argparse
import gzip
import platform
import re
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mt import attention  # noqa: E402
from mt.run import Run  # noqa: E402

GOLD = ROOT / "tests" / "data" / "gold_align_de_en.txt"
LINK = re.compile(r"^(\d+)([-?])(\d+)$")


def read_gold(path: Path = GOLD) -> dict[int, tuple[set, set]]:
    """{line: (sure, possible)}, possible including sure; a malformed line fails naming it."""
    gold = {}
    for n, raw in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not raw.strip() or raw.startswith("#"):
            continue
        lineno, _, links = raw.partition("\t")
        sure, possible = set(), set()
        for link in links.split():
            match = LINK.match(link)
            if not match:
                raise SystemExit(f"{path}:{n}: bad link {link!r} (want i-j or i?j)")
            pair = (int(match.group(1)), int(match.group(3)))
            possible.add(pair)
            if match.group(2) == "-":
                sure.add(pair)
        gold[int(lineno)] = (sure, possible)
    return gold


def read_lines(path: Path, numbers: list[int]) -> list[str]:
    with gzip.open(path, "rt", encoding="utf-8", newline="\n") as f:
        lines = f.read().split("\n")
    return [lines[n - 1] for n in numbers]


def scores(predicted: list[set], gold: list[tuple[set, set]]) -> dict:
    a = sum(len(p) for p in predicted)
    s = sum(len(g[0]) for g in gold)
    a_s = sum(len(p & g[0]) for p, g in zip(predicted, gold))
    a_p = sum(len(p & g[1]) for p, g in zip(predicted, gold))
    return {"aer": 100 * (1 - (a_s + a_p) / (a + s)), "precision": 100 * a_p / max(a, 1), "recall": 100 * a_s / max(s, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-m", "--model", required=True, help="run directory")
    parser.add_argument("--data", default=str(ROOT / "data" / "multi30k"))
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "alignment.md"))
    parser.add_argument("--checkpoint", default=None)
    args = parser.parse_args()
    torch.set_num_threads(2)

    gold = read_gold()
    numbers = sorted(gold)
    src_lines = read_lines(Path(args.data) / "test_2016_flickr.de.gz", numbers)
    tgt_lines = read_lines(Path(args.data) / "test_2016_flickr.en.gz", numbers)
    loaded = Run(args.model).load_for_inference(args.checkpoint, "fp32", "cpu")
    model, src_tok, tgt_tok = loaded.model, loaded.src_tok, loaded.tgt_tok
    src_ids, out_ids = src_tok.encode(src_lines), tgt_tok.encode(tgt_lines)
    src_words = [attention.word_index(src_tok.pieces(ids)) for ids in src_ids]
    tgt_words = [attention.word_index(tgt_tok.pieces(ids)) for ids in out_ids]
    for n, line, words in [*zip(numbers, src_lines, src_words), *zip(numbers, tgt_lines, tgt_words)]:
        if max(words) + 1 != len(line.split()):
            raise SystemExit(f"line {n}: {len(line.split())} words but {max(words) + 1} from its pieces: {line!r}")
    layers = attention.forced(model, src_ids, out_ids, attention.modules(model, "cross"))  # (B, H, T, S) each

    def predict(matrix_of) -> list[set]:
        return [set(attention.links(matrix_of(b)[: len(t), : len(s)], sw, tw))
                for b, (s, t, sw, tw) in enumerate(zip(src_ids, out_ids, src_words, tgt_words))]

    gold_list = [gold[n] for n in numbers]
    half = len(numbers) // 2
    rows = []
    L, H = len(layers), layers[0].shape[1]
    for layer in range(L):
        rows.append((f"layer {layer + 1}, heads averaged", predict(lambda b: layers[layer][b].mean(0))))
    for layer in range(L):  # the row where the decoder reads y_t instead of the one that predicts it
        rows.append((f"layer {layer + 1}, heads averaged, next row",
                     predict(lambda b: torch.cat([layers[layer][b, :, 1:], layers[layer][b, :, -1:]], 1).mean(0))))
    rows.append(("all layers and heads averaged", predict(lambda b: torch.stack([w[b] for w in layers]).mean((0, 1)))))
    for layer in range(L):
        for head in range(H):
            rows.append((f"layer {layer + 1}, head {head + 1}", predict(lambda b: layers[layer][b, head])))
    table = []
    for name, predicted in rows:
        table.append((name, scores(predicted, gold_list), scores(predicted[:half], gold_list[:half]),
                      scores(predicted[half:], gold_list[half:])))
    cpu = subprocess.run("lscpu | grep -o 'avx512_bf16\\|amx_bf16\\|avx2' | sort -u | tr '\\n' ' '",
                         shell=True, capture_output=True, text=True).stdout.strip()
    sure = sum(len(g[0]) for g in gold_list)
    possible = sum(len(g[1]) for g in gold_list) - sure
    lines = [
        "# Word alignment from cross-attention: error rate on hand-annotated Multi30k",
        "",
        f"Produced by `python scripts/eval_align.py -m {args.model}`. Gold: `tests/data/gold_align_de_en.txt`, "
        f"test_2016_flickr lines 1-{numbers[-1]} ({len(numbers)} sentence pairs, {sure} sure and {possible} "
        "possible links, annotated by hand). The reference translation is forced through the model; each "
        "target piece links to the source piece it attends to most (`</s>` excluded), pieces merge into "
        "words. AER, precision and recall in %, lower AER is better. "
        f"Machine: {platform.machine()}, CPU flags `{cpu}`, torch {torch.__version__}.",
        "",
        "`mt translate --align` averages all layers and heads (`mt.attention.align`); `--align-layer N` uses "
        "layer N alone, heads averaged. A single head can align better, but which one is a property of one "
        "trained model, not a default for all.",
        "",
        f"| cross-attention of | AER (all {len(numbers)}) | precision | recall | AER lines 1-{half} | "
        f"AER lines {half + 1}-{len(numbers)} |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, whole, first, second in table:
        lines.append(f"| {name} | {whole['aer']:.1f} | {whole['precision']:.1f} | {whole['recall']:.1f} | "
                     f"{first['aer']:.1f} | {second['aer']:.1f} |")
    text = "\n".join(lines) + "\n"
    print(text)
    Path(args.out).write_text(text, encoding="utf-8")


if __name__ == "__main__":
    main()
