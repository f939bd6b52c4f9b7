#!/usr/bin/env bash
# The full Multi30k recipe, one direction after the other: train (tokenizer included), translate val and
# test_2016_flickr with the run's defaults (checkpoint, beam and length penalty chosen on val), score with
# sacreBLEU; results go to benchmarks/multi30k.md.
#
#   scripts/multi30k.sh [de-en] [en-de]        (default: both; make data first)
#
# Environment: MT (default .venv/bin/mt), RUNS (default runs), OUT (default benchmarks/multi30k.md),
# CONFIGS (default configs: where multi30k_SRC_TGT.yaml are), DATA (default data/multi30k: the val and
# test_2016_flickr files to translate), TIME (optional train.max_time override,
# e.g. 10m, for a quick look; the table says so). Relative paths are taken from the repository root.
set -euo pipefail
cd "$(dirname "$0")/.."
MT=${MT:-.venv/bin/mt}
PY=${PY:-$(dirname "$MT")/python}
RUNS=${RUNS:-runs}
OUT=${OUT:-benchmarks/multi30k.md}
DATA=${DATA:-data/multi30k}
directions=("$@")
[ ${#directions[@]} -gt 0 ] || directions=(de-en en-de)

for pair in "${directions[@]}"; do
  src=${pair%-*} tgt=${pair#*-}
  config=${CONFIGS:-configs}/multi30k_${src}_${tgt}.yaml
  run=$RUNS/multi30k_${src}_${tgt}
  [ -f "$config" ] || { echo "multi30k.sh: $config: no recipe for $pair" >&2; exit 1; }
  rm -rf "$run"
  overrides=()
  [ -z "${TIME:-}" ] || overrides+=("train.max_time=$TIME")
  start=$(date +%s)
  train_cmd="mt train $config -o $run ${overrides[*]:-}"
  echo "== $pair: $train_cmd" >&2
  "$MT" train "$config" -o "$run" -q ${overrides[@]+"${overrides[@]}"}
  for split in val test_2016_flickr; do
    gzip -dc "$DATA/$split.$src.gz" | "$MT" translate -m "$run" > "$run/$split.hyp.$tgt"
    "$MT" eval -r "$DATA/$split.$tgt.gz" -s "$run/$split.hyp.$tgt" --metrics bleu,chrf --json -w 2 \
      > "$run/$split.scores.json"
  done
  end=$(date +%s)
  "$PY" -c 'import json, sys; print(json.dumps(dict(zip(["pair", "config", "run", "seconds", "train_cmd"], sys.argv[1:]))))' \
    "$pair" "$config" "$run" $((end - start)) "$train_cmd" > "$run/recipe.json"
  echo "== $pair: $((end - start)) s" >&2
done

# the table, from every direction whose run is complete
"$PY" scripts/multi30k_table.py "$OUT" "$RUNS" "${TIME:-}" "$DATA"
