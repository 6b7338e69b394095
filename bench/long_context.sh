#!/usr/bin/env bash
# The longest context ftx trains at batch 1 (QLoRA r32 all-linear, offloaded checkpointing), per
# (shape, memory budget), against Unsloth's published figures. One command on the GPU machine:
#
#   FTX=.dev/ftx bash bench/long_context.sh
#
# Each length runs in its own process (`ftx bench train ... --device-memory-gib B`: the run
# confined to B GiB, as on a card that size; a budget of at least the card's memory runs on
# the whole card), so an out-of-memory probe costs only itself.
#
# ROWS: "shape:budget_gib:unsloth_tokens[:target_tokens]" entries (default: the issue's four
#   rows and targets; without a target, TARGET_RATIO (1.2) × Unsloth's figure).
# MODE=target (default): one run per row at its target: fits or not, with tokens/s. MODE=search: the longest length that fits, by bisection between LO (default
#   Unsloth's figure / 2) and HI (default 2 × the target), to GRAN tokens (default 1024); the
#   target is probed first and the bounds move from there.
# STEPS/WARMUP (default 2/1; 1/0 halves a long row's time: the optimizer state exists from the
#   start, so the first step's peak is the run's), OPTIMIZER (adamw-8bit, Unsloth's notebooks'
#   setting; adamw for fp32 moments), RANK (32), PROBE_TIMEOUT seconds per run (900).
# Output: every run's JSON line in $OUT/long_context.jsonl, then one table row per (shape,
# budget): the longest length that fit (`tokens`), its tokens/s, peak GiB (max allocated),
# the planner's GiB for that run and the difference, the checkpointed segment (layers per kept
# input; > 1 when the host could not hold every layer's input), the host GiB the offloaded
# inputs took, Unsloth's figure, the ratio tokens / Unsloth, the target and whether it is met.
set -u
HERE=$(cd "$(dirname "$0")" && pwd)
FTX=${FTX:-$HERE/../target/release/ftx}
OUT=${OUT:-/tmp/ftx-bench}; mkdir -p "$OUT"; RES=$OUT/long_context.jsonl; : > "$RES"
# The libtorch ftx links against: the one in this machine's python3 (prepended: a CUDA image
# may set LD_LIBRARY_PATH to its own CUDA folders).
export LD_LIBRARY_PATH=$(python3 -c 'import torch,os;print(os.path.dirname(torch.__file__))')/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
ROWS=${ROWS:-"llama-3.1-8b:16:40724:96000 llama-3.1-70b:48:12106:14528 llama-3.1-8b:80:342000:410400 llama-3.1-70b:80:89389:107267"}
MODE=${MODE:-target}; TARGET_RATIO=${TARGET_RATIO:-1.2}; GRAN=${GRAN:-1024}
STEPS=${STEPS:-2}; WARMUP=${WARMUP:-1}; OPTIMIZER=${OPTIMIZER:-adamw-8bit}; RANK=${RANK:-32}
PROBE_TIMEOUT=${PROBE_TIMEOUT:-900}

# The card's memory in GiB: a budget at least that large runs on the whole card (an "80 GB"
# H100 has 79.6 GiB, so `--device-memory-gib 80` could not be set aside).
CARD_GIB=$(nvidia-smi --query-gpu=memory.total --format=csv,noheader,nounits 2>/dev/null | head -1 | awk '{printf "%d", $1 / 1024}')

# probe SHAPE BUDGET SEQ: runs one length; prints its JSON line and returns 0 when it fit.
probe() {
  local t0 r err=$OUT/probe.err cap="--device-memory-gib $2"
  [ -n "$CARD_GIB" ] && [ "$2" -ge "$CARD_GIB" ] && cap=""
  t0=$(date +%s)
  r=$(timeout "$PROBE_TIMEOUT" "$FTX" bench train --shape "$1" --method qlora --rank "$RANK" --seq "$3" --batch 1 \
      --steps "$STEPS" --warmup "$WARMUP" --grad-checkpointing --offload $cap \
      --optimizer "$OPTIMIZER" 2>"$err" | tail -1)
  if [ -n "$r" ] && [ "${r#\{}" != "$r" ]; then
    echo "$r" | sed "s/}\$/,\"budget_gib\":$2,\"fits\":true}/" >> "$RES"
    echo "  $1 in $2 GiB, $3 tokens: fits ($(( $(date +%s) - t0 )) s) $r" >&2
    return 0
  fi
  local why
  why=$(grep -o "CUDA out of memory.\{0,120\}\|out of memory\|Cannot allocate memory\|error.\{0,160\}" "$err" | tail -1)
  [ -z "$why" ] && why="exit without a result (timeout ${PROBE_TIMEOUT}s?): $(tail -1 "$err")"
  echo "{\"shape\":\"$1\",\"budget_gib\":$2,\"seq\":$3,\"fits\":false,\"why\":$(printf '%s' "$why" | python3 -c 'import json,sys;print(json.dumps(sys.stdin.read()))')}" >> "$RES"
  echo "  $1 in $2 GiB, $3 tokens: does not fit ($(( $(date +%s) - t0 )) s): $why" >&2
  return 1
}

for row in $ROWS; do
  IFS=: read -r shape budget unsloth target <<< "$row"
  [ -z "$target" ] && target=$(python3 -c "import math;print(math.ceil($unsloth*$TARGET_RATIO))")
  echo "== $shape in $budget GiB: Unsloth $unsloth tokens, target $target" >&2
  if [ "$MODE" = search ]; then
    lo=${LO:-$((unsloth / 2))}; hi=${HI:-$((target * 2))}
    if probe "$shape" "$budget" "$target"; then lo=$target; else hi=$target; fi
    while [ $((hi - lo)) -gt "$GRAN" ]; do
      mid=$(( (lo + hi) / 2 / GRAN * GRAN )); [ "$mid" -le "$lo" ] && mid=$((lo + GRAN))
      if probe "$shape" "$budget" "$mid"; then lo=$mid; else hi=$mid; fi
    done
  else
    probe "$shape" "$budget" "$target"
  fi
done

TARGET_RATIO=$TARGET_RATIO python3 - "$RES" "$ROWS" <<'EOF'
import json, math, os, sys
runs = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
print(f"{'shape':<15}{'GiB':>5}{'tokens':>9}{'tok/s':>9}{'peak':>7}{'plan':>7}{'plan err':>9}{'seg':>5}{'host GiB':>9}{'Unsloth':>9}{'ratio':>7}{'target':>9}  met")
for row in sys.argv[2].split():
    shape, budget, unsloth, *rest = row.split(":")
    target = int(rest[0]) if rest and rest[0] else math.ceil(int(unsloth) * float(os.environ["TARGET_RATIO"]))
    mine = [r for r in runs if r["shape"] == shape and float(r["budget_gib"]) == float(budget)]
    fit = [r for r in mine if r["fits"]]
    if not fit:
        tried = ", ".join(str(r["seq"]) for r in mine)
        print(f"{shape:<15}{budget:>5}   none fit (tried {tried}); target {target}  no")
        continue
    b = max(fit, key=lambda r: r["seq"])
    peak, plan = b.get("peak_gib"), b.get("planned_gib")
    err = f"{(plan - peak) / peak * 100:+.0f}%" if peak and plan else "-"
    fmt = lambda v, f: format(v, f) if v is not None else "-"
    print(f"{shape:<15}{budget:>5}{b['seq']:>9}{b['tokens_per_s']:>9.0f}{fmt(peak, '.1f'):>7}{fmt(plan, '.1f'):>7}{err:>9}"
          f"{fmt(b.get('checkpoint_segment'), 'd'):>5}{fmt(b.get('host_offload_gib'), '.1f'):>9}{int(unsloth):>9}{b['seq'] / int(unsloth):>6.2f}x"
          f"{target:>9}  {'yes' if b['seq'] >= target else 'no'}")
EOF
