"""The table of scripts/multi30k.sh: benchmarks/multi30k.md from the finished runs.

    python scripts/multi30k_table.py OUT RUNS [TIME] [DATA]
"""

import json
import platform
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from mt.run import Run  # noqa: E402

out, runs, time_override, data = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3], sys.argv[4]
rows, commands, signatures = [], [], set()
for pair in ("de-en", "en-de"):
    src, tgt = pair.split("-")
    run = runs / f"multi30k_{src}_{tgt}"
    if not (run / "recipe.json").exists():
        continue
    recipe = json.loads((run / "recipe.json").read_text())
    recipe["seconds"] = int(recipe["seconds"])
    scores = {split: {s["name"]: s for s in json.loads((run / f"{split}.scores.json").read_text())}
              for split in ("val", "test_2016_flickr")}
    layout = Run(run)
    end = [json.loads(line) for line in layout.metrics_path.read_text().splitlines() if '"end"' in line][-1]
    chosen = layout.read_defaults()
    state = torch.load(layout.checkpoint_path("last"), weights_only=True, map_location="cpu")
    params = sum(v.numel() for v in {v.data_ptr(): v for v in state["model"].values()}.values())  # tied: once
    rows.append(f"| {src}→{tgt} | {scores['test_2016_flickr']['BLEU']['score']:.2f} | "
                f"{scores['test_2016_flickr']['chrF2']['score']:.2f} | {scores['val']['BLEU']['score']:.2f} | "
                f"{scores['val']['chrF2']['score']:.2f} | {recipe['seconds'] / 60:.1f} | {end['step']} | "
                f"{end['epoch']} | {params / 1e6:.1f}M | {chosen.get('checkpoint', 'best')}, beam "
                f"{chosen.get('beam', '?')}, lenpen {chosen.get('lenpen', '?')} |")
    commands += [recipe["train_cmd"],
                 f"zcat {data}/test_2016_flickr.{src}.gz | mt translate -m {recipe['run']} > hyp.{tgt}",
                 f"mt eval -r {data}/test_2016_flickr.{tgt}.gz -s hyp.{tgt} --metrics bleu,chrf"]
    signatures |= {f"{s['name']}|{s['signature']}" for split in scores.values() for s in split.values()}
table = [
    "# Multi30k: the reference recipe on 2 CPU cores",
    "",
    "Produced by `scripts/multi30k.sh`" + (f" with `TIME={time_override}` (shortened budget)" if time_override else "")
    + f". Machine: {platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}. "
    "Wall time covers tokenizer training, data preparation, training, the choice of checkpoint/beam/length "
    "penalty on val, and translating val and test. Scores: sacreBLEU on detokenized, cased output.",
    "",
    "| direction | test_2016 BLEU | test_2016 chrF | val BLEU | val chrF | minutes | steps | epochs | "
    "parameters | decoding (chosen on val) |",
    "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    *rows,
    "",
    "Signatures: " + "; ".join(f"`{s}`" for s in sorted(signatures)),
    "",
    "Commands:",
    "",
    "```sh",
    *commands,
    "```",
]
out.parent.mkdir(parents=True, exist_ok=True)
out.write_text("\n".join(table) + "\n", encoding="utf-8")
print("\n".join(table))
