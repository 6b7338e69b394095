#!/usr/bin/env bash
# The GPU training benchmark in one command: ftx and the peers (HF+PEFT, HF+PEFT+Liger, Unsloth)
# back to back on the same machine, then one table (bench/table.py) with ratios against HF+PEFT.
#
#   FTX=.dev/ftx PEERS=.dev/peers bash bench/train_vs_peers.sh
#
# FTX: the ftx binary. PEERS: a copy of the peers' folder (../shared/bench with its whl/ made by
# get_wheels.sh); without it only ftx runs. METHODS, SHAPES, GCS pick the ftx runs (defaults:
# lora dora qlora full / llama-3.2-1b / 0 1). Results go to $OUT (default /tmp/ftx-bench).
set -u
HERE=$(cd "$(dirname "$0")" && pwd)
FTX=${FTX:-$HERE/../target/release/ftx}
OUT=${OUT:-/tmp/ftx-bench}; mkdir -p "$OUT"; RES=$OUT/results.jsonl; : > "$RES"
export OUT
if [ -z "${LD_LIBRARY_PATH:-}" ]; then
  export LD_LIBRARY_PATH=$(python3 -c 'import torch,os;print(os.path.dirname(torch.__file__))')/lib
fi
SEQ=${SEQ:-2048}; BS=${BS:-8}; STEPS=${STEPS:-12}
for shape in ${SHAPES:-llama-3.2-1b}; do
  for gc in ${GCS:-0 1}; do
    for m in ${METHODS:-lora dora qlora full}; do
      [ "$gc" = 1 ] && [ "$m" != lora ] && continue
      flag=""; [ "$gc" = 1 ] && flag="--grad-checkpointing"
      r=$("$FTX" bench train --shape "$shape" --method "$m" --seq "$SEQ" --batch "$BS" --steps "$STEPS" $flag 2>"$OUT/ftx.err" | tail -1)
      if [ -n "$r" ]; then echo "$r" | tee -a "$RES"; else echo "ftx $shape $m gc=$gc failed:"; tail -3 "$OUT/ftx.err"; fi
    done
  done
done
if [ -n "${PEERS:-}" ] && [ -f "$PEERS/run_baselines.sh" ]; then
  SYSTEMS=${SYSTEMS:-hf liger unsloth} GCS=${GCS:-0 1} bash "$PEERS/run_baselines.sh" > "$OUT/peers.log" 2>&1
  sed -n 's/^{"label":"[^"]*","result":\(.*\)}$/\1/p' "$OUT/baselines.jsonl" >> "$RES"
  if [ -f "$PEERS/hf_lora_bench.py" ] && echo "${METHODS:-full}" | grep -q full; then
    SHAPE=llama-3.2-1b METHOD=full SEQ=$SEQ BS=$BS GC=0 python3 "$PEERS/hf_lora_bench.py" 2>/dev/null | tail -1 >> "$RES"
  fi
fi
python3 "$HERE/table.py" "$RES"
