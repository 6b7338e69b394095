#!/usr/bin/env bash
# The serving benchmark in one command: `ftx serve` and transformers' own continuous batching
# (ContinuousBatchingManager) on the same random checkpoint of each shape, the same prompts, the
# same GPU; one table of output tokens/s and time to first token, with the ftx/HF ratio.
#
#   FTX=target/release/ftx bash bench/serve_vs_hf.sh
#
# SHAPES (default "llama-3.2-1b llama-3.1-8b"), CONC ("1 8 64"), PROMPT tokens (512), NEW tokens
# (256), REQUESTS per concurrency (default max(2 × conc, 8)), DTYPE (bf16), DEVICE (cuda),
# HF=0 skips transformers, PYTHON (python3: needs transformers ≥ 5 for the HF side), TIMEOUT
# seconds for each step (900). FTX_SERVE_PROFILE=1 has the server time each step by phase and
# prints its `serve profile` lines (every 10 s while busy) after each shape. Checkpoints are
# written once under $OUT/models (default OUT=/tmp/ftx-serve-bench) by `ftx bench random-model`
# and read by both systems.
set -u -o pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
FTX=${FTX:-$HERE/../target/release/ftx}
PYTHON=${PYTHON:-python3}
OUT=${OUT:-/tmp/ftx-serve-bench}; mkdir -p "$OUT/models"; RES=$OUT/results.jsonl; : > "$RES"
SHAPES=${SHAPES:-llama-3.2-1b llama-3.1-8b}; CONC=${CONC:-1 8 64}; PROMPT=${PROMPT:-512}; NEW=${NEW:-256}
DTYPE=${DTYPE:-bf16}; DEVICE=${DEVICE:-cuda}; TIMEOUT=${TIMEOUT:-900}; REQUESTS=${REQUESTS:-0}
# The libtorch ftx links against, prepended (a CUDA image may set its own LD_LIBRARY_PATH).
export LD_LIBRARY_PATH=$("$PYTHON" -c 'import torch,os;print(os.path.dirname(torch.__file__))')/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
[ -x "$FTX" ] || { echo "serve_vs_hf: no ftx binary at $FTX (set FTX=)"; exit 2; }
PROFILE_ARGS=""; case "${FTX_SERVE_PROFILE:-0}" in ""|0) ;; *) PROFILE_ARGS="--log info" ;; esac
MAXC=0; for c in $CONC; do [ "$c" -gt "$MAXC" ] && MAXC=$c; done
status=0
for shape in $SHAPES; do
  dir=$OUT/models/$shape
  if [ ! -f "$dir/model.safetensors" ] || [ ! -f "$dir/tokenizer.json" ]; then
    if ! timeout "$TIMEOUT" "$FTX" bench random-model --shape "$shape" --out "$dir" --device "$DEVICE" --dtype "$DTYPE" 2>"$OUT/model-$shape.err"; then
      echo "serve_vs_hf: writing the random $shape failed:"; tail -5 "$OUT/model-$shape.err"; status=1; continue
    fi
  fi
  vocab=$("$PYTHON" -c 'import json,sys;print(json.load(open(sys.argv[1]))["vocab_size"])' "$dir/config.json")
  # ftx: a server on a free loopback port, its pool sized for MAXC sequences of PROMPT + NEW.
  port=$("$PYTHON" -c 'import socket;s=socket.socket();s.bind(("127.0.0.1",0));print(s.getsockname()[1])')
  "$FTX" serve --model "$dir" --device "$DEVICE" --dtype "$DTYPE" --port "$port" --max-batch "$MAXC" \
    --queue $((4 * MAXC + 16)) --kv-cache-tokens $((MAXC * (PROMPT + NEW + 32))) $PROFILE_ARGS ${FTX_SERVE_ARGS:-} >"$OUT/serve-$shape.log" 2>&1 &
  pid=$!
  up=0
  for _ in $(seq 1 "$TIMEOUT"); do
    kill -0 "$pid" 2>/dev/null || break
    if "$PYTHON" -c 'import sys,urllib.request;urllib.request.urlopen(sys.argv[1],timeout=2)' "http://127.0.0.1:$port/health" 2>/dev/null; then up=1; break; fi
    sleep 1
  done
  if [ "$up" = 1 ]; then
    timeout $((3 * TIMEOUT)) "$PYTHON" "$HERE/serve_bench.py" ftx --url "http://127.0.0.1:$port" --model "$shape" --vocab "$vocab" \
      --conc "$CONC" --prompt "$PROMPT" --new "$NEW" --requests "$REQUESTS" --label "$shape" --timeout "$TIMEOUT" | tee -a "$RES" \
      || { echo "serve_vs_hf: the ftx load run on $shape failed or timed out"; status=1; }
  else
    echo "serve_vs_hf: ftx serve did not come up on $shape:"; tail -5 "$OUT/serve-$shape.log"; status=1
  fi
  kill -TERM "$pid" 2>/dev/null; wait "$pid" 2>/dev/null
  [ -n "$PROFILE_ARGS" ] && grep -o 'serve profile.*' "$OUT/serve-$shape.log" | sed "s/^/$shape /"
  if [ "${HF:-1}" != 0 ]; then
    timeout $((3 * TIMEOUT)) "$PYTHON" "$HERE/serve_bench.py" hf --model-dir "$dir" --device "$DEVICE" --dtype "$DTYPE" --vocab "$vocab" \
      --conc "$CONC" --prompt "$PROMPT" --new "$NEW" --requests "$REQUESTS" --label "$shape" --timeout "$TIMEOUT" 2>"$OUT/hf-$shape.err" | tee -a "$RES" \
      || { echo "serve_vs_hf: transformers on $shape failed or timed out:"; tail -5 "$OUT/hf-$shape.err"; status=1; }
  fi
done
"$PYTHON" "$HERE/serve_bench.py" table "$RES"
exit $status
