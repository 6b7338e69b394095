#!/usr/bin/env bash
# The GPU training benchmark in one command: ftx and the peers (HF+PEFT, HF+PEFT+Liger, Unsloth)
# back to back on the same machine, then one table (bench/table.py) with ratios against HF+PEFT.
#
#   FTX=.dev/ftx PEERS=.dev/peers bash bench/train_vs_peers.sh
#
# FTX: the ftx binary. PEERS: a copy of the peers' folder (../shared/bench with its whl/ made by
# get_wheels.sh); without it only ftx runs. METHODS, SHAPES, GCS pick the ftx runs (defaults:
# lora dora qlora full / llama-3.2-1b / 0 1 2; 1 = checkpointing, 2 = offloaded); LONG the QLoRA
# 8b context lengths tried at batch 1 within 16 GiB (default 65536; LONG= skips). UNFUSED=1 also
# runs every ftx row with --unfused (each projection on its own: the before/after of the fused
# projections with one binary); CHECK=1 adds --check-fused (fused against separate gradients on
# the device, `fused_grad_rel_diff`). Results go to $OUT (default /tmp/ftx-bench).
set -u
HERE=$(cd "$(dirname "$0")" && pwd)
FTX=${FTX:-$HERE/../target/release/ftx}
OUT=${OUT:-/tmp/ftx-bench}; mkdir -p "$OUT"; RES=$OUT/results.jsonl; : > "$RES"
export OUT
# The libtorch ftx links against: the one in this machine's python3 (a CUDA image may set
# LD_LIBRARY_PATH to its own CUDA folders, so prepend rather than only fill an empty one).
export LD_LIBRARY_PATH=$(python3 -c 'import torch,os;print(os.path.dirname(torch.__file__))')/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
SEQ=${SEQ:-2048}; BS=${BS:-8}; STEPS=${STEPS:-12}
for shape in ${SHAPES:-llama-3.2-1b}; do
  for gc in ${GCS:-0 1 2}; do
    for m in ${METHODS:-lora dora qlora full}; do
      [ "$gc" != 0 ] && [ "$m" != lora ] && continue
      flag=""; [ "$gc" = 1 ] && flag="--grad-checkpointing"; [ "$gc" = 2 ] && flag="--grad-checkpointing --offload"
      for variant in "" ${UNFUSED:+--unfused}; do
        r=$("$FTX" bench train --shape "$shape" --method "$m" --seq "$SEQ" --batch "$BS" --steps "$STEPS" $flag $variant ${CHECK:+--check-fused} 2>"$OUT/ftx.err" | tail -1)
        if [ -n "$r" ]; then echo "$r" | tee -a "$RES"; else echo "ftx $shape $m gc=$gc $variant failed:"; tail -3 "$OUT/ftx.err"; fi
      done
    done
  done
done
# QLoRA on the 8b shape at batch 1: each LONG context length with the run confined to 16 GiB.
for seq in ${LONG:-65536}; do
  r=$("$FTX" bench train --shape llama-3.1-8b --method qlora --seq "$seq" --batch 1 --steps 2 --warmup 1 --grad-checkpointing --offload --device-memory-gib 16 2>"$OUT/ftx.err" | tail -1)
  if [ -n "$r" ]; then echo "$r" | tee -a "$RES"; else echo "ftx qlora 8b seq $seq in 16 GiB failed:"; grep -o "CUDA out of memory.\{0,200\}" "$OUT/ftx.err" | tail -1; fi
done
if [ -n "${PEERS:-}" ] && [ -f "$PEERS/run_baselines.sh" ]; then
  SYSTEMS=${SYSTEMS:-hf liger unsloth} GCS=$(echo "${GCS:-0 1}" | tr -d 2) bash "$PEERS/run_baselines.sh" > "$OUT/peers.log" 2>&1
  sed -n 's/^{"label":"[^"]*","result":\(.*\)}$/\1/p' "$OUT/baselines.jsonl" >> "$RES"
  if [ -f "$PEERS/hf_lora_bench.py" ] && echo "${METHODS:-full}" | grep -q full; then
    SHAPE=llama-3.2-1b METHOD=full SEQ=$SEQ BS=$BS GC=0 python3 "$PEERS/hf_lora_bench.py" 2>/dev/null | tail -1 >> "$RES"
  fi
fi
python3 "$HERE/table.py" "$RES"
