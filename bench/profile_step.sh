#!/usr/bin/env bash
# Where a training step's GPU time goes, kernel by kernel, for ftx and Unsloth on the same card:
# Nsight Compute times every kernel (one metric, clocks left alone), then bench/kernel_table.py
# finds the last whole step in each trace and sums it by kind (GEMM, attention, elementwise, ...).
#
#   FTX=.dev/ftx PEERS=.dev/peers OUT=/tmp/prof bash bench/profile_step.sh
#
# FTX_ARGS picks the ftx rows (default: fused and --unfused LoRA on llama-3.2-1b, seq 2048, batch 8);
# PEERS (../shared/bench with its whl/) adds Unsloth's step. Needs ncu (Nsight Compute) on PATH.
set -u
HERE=$(cd "$(dirname "$0")" && pwd)
FTX=${FTX:-$HERE/../target/release/ftx}
OUT=${OUT:-/tmp/ftx-prof}; mkdir -p "$OUT"
SEQ=${SEQ:-2048}; BS=${BS:-8}
# The libtorch ftx links against: the one in this machine's python3 (a CUDA image may set
# LD_LIBRARY_PATH to its own CUDA folders, so prepend rather than only fill an empty one).
export LD_LIBRARY_PATH=$(python3 -c 'import torch,os;print(os.path.dirname(torch.__file__))')/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
NCU="ncu --clock-control none --metrics gpu__time_duration.sum --csv --page raw --print-units base"
for variant in ${VARIANTS:-fused unfused}; do
  flag=""; [ "$variant" = unfused ] && flag=--unfused
  $NCU --log-file "$OUT/ftx_$variant.csv" "$FTX" bench train --shape llama-3.2-1b --method lora \
    --seq "$SEQ" --batch "$BS" --steps 4 --warmup 3 $flag ${FTX_ARGS:-} > "$OUT/ftx_$variant.out" 2>&1 \
    || { echo "ncu ftx $variant failed"; tail -5 "$OUT/ftx_$variant.out"; }
done
if [ -n "${PEERS:-}" ] && [ -f "$PEERS/peers_bench.py" ]; then
  export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 UNSLOTH_DISABLE_STATISTICS=1 HF_HOME=/tmp/hf TOKENIZERS_PARALLELISM=false
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site_unsloth "$PEERS"/whl/unsloth/*.whl
  [ -f /tmp/rand-llama-1b/config.json ] || SYSTEM=save DIR=/tmp/rand-llama-1b python3 "$PEERS/peers_bench.py" > /dev/null 2>&1
  PYTHONPATH=/tmp/site_unsloth SYSTEM=unsloth GC=0 STEPS=5 SEQ=$SEQ BS=$BS DIR=/tmp/rand-llama-1b \
    $NCU --log-file "$OUT/unsloth.csv" python3 "$PEERS/peers_bench.py" > "$OUT/unsloth.out" 2>&1 \
    || { echo "ncu unsloth failed"; tail -5 "$OUT/unsloth.out"; }
fi
python3 "$HERE/kernel_table.py" "$OUT"/*.csv | tee "$OUT/kernel_table.txt"
