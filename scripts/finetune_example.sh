#!/usr/bin/env bash
# Fine-tuning where it matters: French->English from only 3,000 Multi30k pairs, trained from scratch
# vs fine-tuned from a German->English parent (train.init_from), both for the same time budget.
# The parent's tokenizer covers the three languages (SentencePiece on de, en and fr train text).
# Results go to benchmarks/finetune.md.
#
#   scripts/finetune_example.sh          (make data first; about 40 minutes on 2 CPU cores)
#
# Environment: MT (default .venv/bin/mt), RUNS (default runs/finetune), OUT (default
# benchmarks/finetune.md), PARENT_TIME (default 20m), CHILD_TIME (default 5m), PAIRS (default 3000).
set -euo pipefail
cd "$(dirname "$0")/.."
MT=${MT:-.venv/bin/mt}
RUNS=${RUNS:-runs/finetune}
OUT=${OUT:-benchmarks/finetune.md}
DATA=data/multi30k
PARENT_TIME=${PARENT_TIME:-20m}
CHILD_TIME=${CHILD_TIME:-5m}
PAIRS=${PAIRS:-3000}
mkdir -p "$RUNS"
start=$(date +%s)

spm=$RUNS/spm_de_en_fr.model
[ -f "$spm" ] || "$MT" tokenizer train $DATA/train.de.gz $DATA/train.en.gz $DATA/train.fr.gz -o "$spm" --vocab-size 8000
for lang in fr en; do  # (head closes the pipe early: not an error)
  python3 -c 'import gzip, sys; f = gzip.open(sys.argv[1], "rt", encoding="utf-8", newline="\n"); sys.stdout.write("".join(next(f) for _ in range(int(sys.argv[2]))))' \
    $DATA/train.$lang.gz "$PAIRS" > "$RUNS/train$PAIRS.$lang"
done

# the parent (the longest step) is reused from an earlier run of this script only if it was trained from
# the same recipe, tokenizer and budget: its stamp beside it names them; a changed recipe retrains it
parent=$RUNS/parent_de_en
stamp="$(sha256sum configs/multi30k_de_en.yaml "$spm" | cut -c1-16 | paste -sd ' ') $PARENT_TIME"
if [ ! -f "$parent/checkpoints/last.pt" ] || [ "$(cat "$parent.stamp" 2>/dev/null)" != "$stamp" ]; then
  rm -rf "$parent" "$parent.stamp"
  "$MT" train configs/multi30k_de_en.yaml -o "$parent" -q tokenizer.src_model="$spm" train.max_time="$PARENT_TIME"
  echo "$stamp" > "$parent.stamp"
fi

# the child task: fr->en on PAIRS pairs; no decoding search (beam 5, lenpen 1.0 for both)
child=(data.src_lang=fr data.train.src="$RUNS/train$PAIRS.fr" data.train.tgt="$RUNS/train$PAIRS.en"
       data.valid.src=$DATA/val.fr.gz data.valid.tgt=$DATA/val.en.gz data.test.src=$DATA/test_2016_flickr.fr.gz
       train.max_time="$CHILD_TIME" train.warmup_steps=50 train.valid_every=100 train.average_last=0
       "decode.tune_beam=[]" "decode.tune_lenpen=[]")
rm -rf "$RUNS/fr_en_scratch" "$RUNS/fr_en_finetuned"
scratch_cmd="mt train configs/multi30k_de_en.yaml -o $RUNS/fr_en_scratch tokenizer.src_model=$spm ${child[*]}"
"$MT" train configs/multi30k_de_en.yaml -o "$RUNS/fr_en_scratch" -q tokenizer.src_model="$spm" "${child[@]}"
finetune_cmd="mt train configs/multi30k_de_en.yaml -o $RUNS/fr_en_finetuned train.init_from=$parent train.lr=5e-4 ${child[*]}"
"$MT" train configs/multi30k_de_en.yaml -o "$RUNS/fr_en_finetuned" -q train.init_from="$parent" train.lr=5e-4 "${child[@]}"

bleu() {  # RUN SRC_LANG -> BLEU on test_2016_flickr
  gzip -dc $DATA/test_2016_flickr.$2.gz | "$MT" translate -m "$1" > "$1/test_2016_flickr.hyp.en"
  "$MT" eval -r $DATA/test_2016_flickr.en.gz -s "$1/test_2016_flickr.hyp.en" --metrics bleu,chrf --json -w 2 > "$1/scores.json"
  python3 -c 'import json, sys; s = json.load(open(sys.argv[1])); print(" ".join(format(x["score"], ".2f") for x in s))' "$1/scores.json"
}
steps() { python3 -c 'import json, sys; rows = [json.loads(l) for l in open(sys.argv[1])]; print([r for r in rows if r["kind"] == "end"][-1]["step"])' "$1/metrics.jsonl"; }
read -r parent_bleu parent_chrf < <(bleu "$parent" de)
read -r scratch_bleu scratch_chrf < <(bleu "$RUNS/fr_en_scratch" fr)
read -r ft_bleu ft_chrf < <(bleu "$RUNS/fr_en_finetuned" fr)
cpu=$(lscpu | grep -o 'avx512_bf16\|amx_bf16\|avx2' | sort -u | paste -sd ' ')
precision() { sed -n 's/^  precision: //p' "$1/config.yaml"; }  # what train.precision auto chose
minutes=$(( ($(date +%s) - start) / 60 ))

cat > "$OUT" <<EOF
# Fine-tuning: French→English from $PAIRS pairs, from scratch vs from a German→English parent

Produced by \`scripts/finetune_example.sh\` in $minutes minutes (2 threads; CPU flags \`$cpu\`; precision: auto, which trained the
parent in $(precision "$parent") and the children in $(precision "$RUNS/fr_en_finetuned")).
A joint SentencePiece model (8,000 pieces) is trained on the de, en and fr sides of Multi30k train;
the parent is the reference recipe (\`configs/multi30k_de_en.yaml\`) on all 29,000 de→en pairs for
$PARENT_TIME; each child trains on the first $PAIRS fr→en pairs for $CHILD_TIME (warmup 50, beam 5,
no decoding search). Scores: sacreBLEU on test_2016_flickr, detokenized, cased.

| model | test pairs | updates | BLEU | chrF |
|---|---|---:|---:|---:|
| parent, de→en (29,000 pairs, $PARENT_TIME) | de→en | $(steps "$parent") | $parent_bleu | $parent_chrf |
| fr→en from scratch ($PAIRS pairs, $CHILD_TIME) | fr→en | $(steps "$RUNS/fr_en_scratch") | $scratch_bleu | $scratch_chrf |
| fr→en fine-tuned from the parent ($PAIRS pairs, $CHILD_TIME, lr 5e-4) | fr→en | $(steps "$RUNS/fr_en_finetuned") | $ft_bleu | $ft_chrf |

Commands:

\`\`\`sh
mt tokenizer train data/multi30k/train.{de,en,fr}.gz -o $spm --vocab-size 8000
mt train configs/multi30k_de_en.yaml -o $parent tokenizer.src_model=$spm train.max_time=$PARENT_TIME
$scratch_cmd
$finetune_cmd
\`\`\`
EOF
cat "$OUT"
