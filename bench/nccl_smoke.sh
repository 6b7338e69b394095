#!/usr/bin/env bash
# One-GPU NCCL smoke run (issue 16; usage: bash bench/nccl_smoke.sh path/to/ftx, from the repo root): dist-check, then the same tiny LoRA run in one process,
# under --nproc-per-node 1 (DDP over NCCL) and under FSDP over NCCL; losses compared.
set -u
FTX=$1; W=/tmp/smoke; rm -rf $W; mkdir -p $W
python3 - <<'PY'
import json, random
random.seed(0)
with open("/tmp/smoke/chat.jsonl", "w") as f:
    for i in range(64):
        a, b = random.randint(1, 50), random.randint(1, 50)
        f.write(json.dumps({"messages": [{"role": "user", "content": f"What is {a} plus {b}?"},
                                          {"role": "assistant", "content": f"{a} plus {b} is {a+b}."}]}) + "\n")
PY
cfg() { cat > $W/$1.toml <<T
[model]
path = "$PWD/tests/fixtures/models/llama3"
dtype = "fp32"
device = "cuda"
[data]
train = ["$W/chat.jsonl"]
format = "chat"
max_seq_len = 64
[method]
kind = "lora"
rank = 8
alpha = 16
target_modules = ["all-linear"]
[train]
lr = 1e-3
max_steps = 6
batch_size = 4
save_every = 0
output_dir = "$W/$1"
[distributed]
strategy = "$2"
backend = "nccl"
T
}
echo "== doctor"; $FTX doctor 2>&1 | head -20
echo "== dist-check nccl x1"; $FTX dist-check --nproc-per-node 1 --backend nccl 2>&1 | tail -15; echo "rc=$?"
cfg single ddp; cfg ddp1 ddp; cfg fsdp1 fsdp
echo "== single"; $FTX train --config $W/single.toml 2>&1 | tail -4
echo "== ddp nproc 1 (nccl)"; $FTX train --config $W/ddp1.toml --nproc-per-node 1 2>&1 | tail -4
echo "== fsdp nproc 1 (nccl)"; $FTX train --config $W/fsdp1.toml --nproc-per-node 1 2>&1 | tail -4
python3 - <<'PY'
import json
def losses(r):
    try:
        return [json.loads(l).get("loss") for l in open(f"/tmp/smoke/{r}/metrics.jsonl") if '"loss"' in l]
    except Exception as e:
        return str(e)
s = losses("single")
for r in ["single", "ddp1", "fsdp1"]:
    l = losses(r); print(r, l)
    if isinstance(l, list) and isinstance(s, list) and len(l) == len(s):
        print("  max |diff| vs single:", max(abs((a or 0) - (b or 0)) for a, b in zip(l, s)))
PY
