#!/usr/bin/env bash
# LoRA on the new model families, ftx beside HF transformers + PEFT, in one command: for each
# shape `ftx bench train` and bench/hf_family_bench.py on the same random model shape, the same
# settings and the same GPU, each in its own process; then one table (bench/table.py --families)
# of tokens/s, peak memory, their ftx/HF ratios, what each trained, and for the MoE the share of
# step time in the experts' GEMMs.
#
#   FTX=target/release/ftx bash bench/families_vs_hf.sh
#
# Settings (environment): SHAPES (default "gemma-2-2b phi-4-mini qwen3-30b-a3b"); LoRA r=RANK
# (16) α=2·RANK on all-linear, bf16, SEQ (2048), STEPS (6, the first WARMUP=2 untimed);
# BS_DENSE (2) for gemma-2-2b and phi-4-mini and BS_MOE (1) for qwen3-30b-a3b: at batch 4 HF
# needs about 97 GiB for gemma-2-2b (eager soft-capped attention, fp32 logits over 256k) and 68
# for phi-4-mini (what autograd keeps, counted on a CPU). The MoE runs MOE_LAYERS (16) of its 48 decoder layers on both
# systems (the table says so): 30.5B bf16 weights are 57 GiB, and HF+PEFT's LoRA on the fused
# experts materialises W + BA per layer (1.2 GB, kept for backward), so the whole model does not
# fit one 80 GB card with HF (nor with ftx's all-linear: `ftx plan` says 79.2 GiB). MOE_TARGETS (default "experts attention") runs the MoE once per
# entry: `experts` = ftx's all-linear (attention, router, every expert's gate/up/down) against
# PEFT on the same modules named explicitly (q/k/v/o, plus `target_parameters` on the router and
# the fused `gate_up_proj` / `down_proj` expert tensors, gate_up at rank 2r as PEFT's own v4 → v5
# conversion of separate gate and up adapters does); `attention` = q/k/v/o only on both (the
# frozen experts still run forward and backward). Trainable parameter counts are in both JSON
# lines. HF=0 skips transformers; PYTHON (python3) runs it.
# TIMEOUT (120) seconds per run and BUDGET (420) seconds for the whole script: a run gets what is
# left, and a failed or timed-out run prints its error's tail and the script goes on. Results go
# to $OUT (default /tmp/ftx-families): results.jsonl, one .err per run. (SHAPES=tiny-moe with
# DEVICE=cpu checks the plumbing on a CPU: ftx's small Qwen3-MoE.)
set -u -o pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
FTX=${FTX:-$HERE/../target/release/ftx}
PYTHON=${PYTHON:-python3}
OUT=${OUT:-/tmp/ftx-families}; mkdir -p "$OUT"; RES=$OUT/results.jsonl; : > "$RES"
SHAPES=${SHAPES:-gemma-2-2b phi-4-mini qwen3-30b-a3b}
SEQ=${SEQ:-2048}; STEPS=${STEPS:-6}; WARMUP=${WARMUP:-2}; RANK=${RANK:-16}
BS_DENSE=${BS_DENSE:-2}; BS_MOE=${BS_MOE:-1}; MOE_LAYERS=${MOE_LAYERS:-16}; MOE_TARGETS=${MOE_TARGETS:-experts attention}
DEVICE=${DEVICE:-cuda}; TIMEOUT=${TIMEOUT:-120}; BUDGET=${BUDGET:-420}
# The libtorch ftx links against: the one in this machine's python3, prepended (a CUDA image
# may set LD_LIBRARY_PATH to its own CUDA folders).
export LD_LIBRARY_PATH=$("$PYTHON" -c 'import torch,os;print(os.path.dirname(torch.__file__))')/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
[ -x "$FTX" ] || { echo "families_vs_hf: no ftx binary at $FTX (set FTX=)"; exit 2; }
start=$(date +%s)
status=0

# run NAME VARIANT TARGETS CMD...: one benchmark process under the time left; its last line,
# with `variant` (what the table pairs ftx and HF by) and `targets` added, goes to the results;
# on failure the tail of its stderr is shown.
run() {
  local name=$1 variant=$2 targets=$3; shift 3
  local left=$((BUDGET - ($(date +%s) - start)))
  [ "$left" -gt "$TIMEOUT" ] && left=$TIMEOUT
  if [ "$left" -lt 20 ]; then echo "families_vs_hf: $name skipped: the ${BUDGET}s budget is spent"; status=1; return; fi
  local line
  line=$(timeout "$left" "$@" 2>"$OUT/$name.err" | tail -1)
  local rc=$?
  if [ "$rc" = 0 ] && [ "${line:0:1}" = "{" ]; then
    "$PYTHON" -c 'import json,sys; r=json.loads(sys.argv[1]); r["variant"]=sys.argv[2]; r.setdefault("targets", sys.argv[3]); print(json.dumps(r))' \
      "$line" "$variant" "$targets" | tee -a "$RES"
  else
    [ "$rc" = 124 ] && echo "families_vs_hf: $name timed out after ${left}s:" || echo "families_vs_hf: $name failed (exit $rc):"
    grep -v "^\s*$" "$OUT/$name.err" | tail -5
    status=1
  fi
}

for shape in $SHAPES; do
  case $shape in
    qwen3-30b-a3b|tiny-moe) bs=$BS_MOE; layers=$MOE_LAYERS; variants=$MOE_TARGETS ;;
    *) bs=$BS_DENSE; layers=${LAYERS:-}; variants=all-linear ;;
  esac
  for v in $variants; do
    case $v in
      attention) ftx_targets=q_proj,k_proj,v_proj,o_proj; what="attention q/k/v/o" ;;
      experts) ftx_targets=all-linear; what="all-linear: attention, router, every expert's gate/up/down" ;;
      *) ftx_targets=all-linear; what="all-linear" ;;
    esac
    tag=$shape${layers:+-L$layers}-$v
    run "ftx-$tag" "$v" "$what" "$FTX" bench train --shape "$shape" --method lora --rank "$RANK" --seq "$SEQ" --batch "$bs" \
      --steps "$STEPS" --warmup "$WARMUP" --target-modules "$ftx_targets" ${layers:+--layers "$layers"} --device "$DEVICE"
    if [ "${HF:-1}" != 0 ]; then
      run "hf-$tag" "$v" "" env SHAPE="$shape" SEQ="$SEQ" BS="$bs" STEPS="$STEPS" WARMUP="$WARMUP" RANK="$RANK" DEVICE="$DEVICE" \
        ${layers:+LAYERS="$layers"} $([ "$v" != all-linear ] && echo MOE_TARGETS="$v") "$PYTHON" "$HERE/hf_family_bench.py"
    fi
  done
done
"$PYTHON" "$HERE/table.py" --families "$RES"
echo "families_vs_hf: $(( $(date +%s) - start ))s"
exit $status
