#!/usr/bin/env bash
# GRPO rollout speed (issue 19): tokens/s of the rollout phase of `ftx train` GRPO (the
# `rollout_tokens_per_s` of metrics.jsonl: sampling alone, not scoring or the update) on a random
# llama-3.2-1b-shaped checkpoint, for $FTX and, when set, $FTX_BEFORE (an older build with the
# same CLI), run one after the other on the same checkpoint, prompts and plugins; printed side by
# side with the after/before ratio.
#
#   FTX=target/release/ftx FTX_BEFORE=/path/to/old/ftx bash bench/rollout_bench.sh
#
# SHAPE (llama-3.2-1b; "tiny" for a quick CPU dry run with DEVICE=cpu), DEVICE (cuda), DTYPE
# (bf16), GROUP completions a prompt (8), PROMPTS_PER_STEP (4), NEW tokens a completion (256),
# STEPS rollouts a run (4; the first is warm-up and reported apart), PROMPT_WORDS (64),
# PLUGINS: the folder holding grpo.wasm and regex_match.wasm (default
# plugins/target/wasm32-wasip2/release, built by `cargo build --release --target wasm32-wasip2
# --manifest-path plugins/Cargo.toml -p grpo -p regex-match`), OUT (/tmp/ftx-rollout-bench),
# PYTHON (python3: libtorch's path and the JSON), TIMEOUT seconds a run (1800).
# The random checkpoint (`ftx bench random-model`: a word-level tokenizer, no end-of-sequence
# token) makes every completion run to NEW tokens, so both builds sample the same token count.
# One JSON line per build goes to $OUT/results.jsonl; each run's metrics.jsonl stays under $OUT.
set -u -o pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
FTX=${FTX:-$HERE/../target/release/ftx}
FTX_BEFORE=${FTX_BEFORE:-}
PYTHON=${PYTHON:-python3}
SHAPE=${SHAPE:-llama-3.2-1b}; DEVICE=${DEVICE:-cuda}; DTYPE=${DTYPE:-bf16}
GROUP=${GROUP:-8}; PROMPTS_PER_STEP=${PROMPTS_PER_STEP:-4}; NEW=${NEW:-256}; STEPS=${STEPS:-4}
PROMPT_WORDS=${PROMPT_WORDS:-64}; TIMEOUT=${TIMEOUT:-1800}
PLUGINS=${PLUGINS:-$HERE/../plugins/target/wasm32-wasip2/release}
OUT=${OUT:-/tmp/ftx-rollout-bench}; mkdir -p "$OUT"; RES=$OUT/results.jsonl; : > "$RES"
# The libtorch ftx links against, prepended (a CUDA image may set its own LD_LIBRARY_PATH);
# without torch in $PYTHON, LD_LIBRARY_PATH must already point at it.
if torch_dir=$("$PYTHON" -c 'import torch,os;print(os.path.dirname(torch.__file__))' 2>/dev/null); then
  export LD_LIBRARY_PATH=$torch_dir/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
fi
for f in grpo.wasm regex_match.wasm; do
  [ -f "$PLUGINS/$f" ] || { echo "rollout_bench: no $PLUGINS/$f: build the plugins (cargo build --release --target wasm32-wasip2 --manifest-path plugins/Cargo.toml -p grpo -p regex-match) or set PLUGINS="; exit 2; }
done
PLUGINS=$(cd "$PLUGINS" && pwd)
builds=("after:$FTX"); [ -n "$FTX_BEFORE" ] && builds=("before:$FTX_BEFORE" "${builds[@]}")
for b in "${builds[@]}"; do
  bin=${b#*:}; [ -x "$bin" ] || { echo "rollout_bench: no ftx binary at $bin (set FTX= / FTX_BEFORE=)"; exit 2; }
done

# The checkpoint, written once by the first build (both read the same files).
model=$OUT/models/$SHAPE
if [ ! -f "$model/model.safetensors" ] || [ ! -f "$model/tokenizer.json" ]; then
  first=${builds[0]#*:}
  if ! timeout "$TIMEOUT" "$first" bench random-model --shape "$SHAPE" --out "$model" --device "$DEVICE" --dtype "$DTYPE" 2>"$OUT/model.err"; then
    echo "rollout_bench: writing the random $SHAPE failed:"; tail -5 "$OUT/model.err"; exit 1
  fi
fi

# Prompts: words of the checkpoint's vocabulary (token i is the word t<i>), the reward a regex
# any completion may or may not match (the reward's value does not matter here, its cost does).
"$PYTHON" - "$model/config.json" "$OUT/prompts.jsonl" "$PROMPT_WORDS" "$PROMPTS_PER_STEP" "$STEPS" <<'EOF'
import json, random, sys
config, out, words, per_step, steps = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
vocab = json.load(open(config))["vocab_size"]
rng = random.Random(19)
with open(out, "w") as f:
    for _ in range(per_step * steps):
        f.write(json.dumps({"prompt": " ".join(f"t{rng.randrange(vocab)}" for _ in range(words)), "reference": "t1[0-9] "}) + "\n")
EOF

status=0
for b in "${builds[@]}"; do
  label=${b%%:*}; bin=${b#*:}; run=$OUT/run-$label
  rm -rf "$run"; mkdir -p "$run"
  cat > "$run/grpo.toml" <<EOF
[model]
path = "$model"
device = "$DEVICE"
dtype = "$DTYPE"

[data]
train = ["$OUT/prompts.jsonl"]
max_seq_len = 1024

[method]
kind = "lora"
rank = 16
alpha = 32

[train]
lr = 1e-5
max_steps = $STEPS
schedule = "constant"
seed = 1
save_every = $((STEPS + 1))
output_dir = "$run/out"

[rl]
algorithm = "grpo"
prompts_per_step = $PROMPTS_PER_STEP
group_size = $GROUP
max_new_tokens = $NEW
temperature = 1.0

[[plugins]]
path = "$PLUGINS/grpo.wasm"
params = { beta = 0.04, epsilon = 0.2 }

[[plugins]]
path = "$PLUGINS/regex_match.wasm"
EOF
  echo "rollout_bench: $label ($bin): GRPO, $SHAPE, $STEPS rollouts of $PROMPTS_PER_STEP prompts × $GROUP completions × $NEW tokens" >&2
  if ! timeout "$TIMEOUT" "$bin" train --config "$run/grpo.toml" >"$run/train.log" 2>&1; then
    echo "rollout_bench: the $label run failed or timed out:"; tail -5 "$run/train.log"; status=1; continue
  fi
  "$PYTHON" - "$run/out/metrics.jsonl" "$label" "$bin" "$SHAPE" "$DEVICE" "$DTYPE" "$GROUP" "$PROMPTS_PER_STEP" "$NEW" <<'EOF' | tee -a "$RES" || status=1
import json, statistics, sys
path, label, binary, shape, device, dtype, group, per_step, new = sys.argv[1:]
speeds = [r["rollout_tokens_per_s"] for r in map(json.loads, open(path)) if "rollout_tokens_per_s" in r]
if not speeds:
    sys.exit(f"rollout_bench: no rollout_tokens_per_s in {path}")
timed = speeds[1:] or speeds
print(json.dumps({"build": label, "binary": binary, "shape": shape, "device": device, "dtype": dtype,
                  "group": int(group), "prompts_per_step": int(per_step), "new_tokens": int(new),
                  "rollout_tokens_per_s": round(statistics.median(timed), 1),
                  "first_rollout_tokens_per_s": round(speeds[0], 1), "per_rollout": [round(s, 1) for s in speeds]}))
EOF
done

# Side by side, with the ratio when both ran.
"$PYTHON" - "$RES" <<'EOF'
import json, sys
rows = {r["build"]: r for r in map(json.loads, open(sys.argv[1]))}
if not rows:
    sys.exit(0)
print(f"{'build':<8} {'rollout tok/s':>14} {'first rollout':>14}")
for name in ("before", "after"):
    if name in rows:
        print(f"{name:<8} {rows[name]['rollout_tokens_per_s']:>14.1f} {rows[name]['first_rollout_tokens_per_s']:>14.1f}")
if "before" in rows and "after" in rows:
    print(f"after/before {rows['after']['rollout_tokens_per_s'] / rows['before']['rollout_tokens_per_s']:.2f}x")
EOF
exit $status
