#!/usr/bin/env python3
"""Tables from `ftx bench train --ledger` JSON lines (issue 15).

    ledger_table.py ONE.json                      per class and the top entries of one ledger
    ledger_table.py --row L,N ONE_LAYER.json TWO_LAYERS.json
        the ledger of an L-layer model on N tokens, extrapolated from two small runs of one
        shape at the same tokens (1 and 2 layers): per-layer work = two − one, the rest = one −
        per-layer; every entry scaled by N / the runs' tokens (every non-GEMM pass of the step is
        token-sized; weight-sized entries — the frozen weights the GEMMs read, the adapters and
        their optimizer — are scaled too and so overstated, by well under 1% at LoRA r16)
    ledger_table.py --row L,N A1 A2 --versus B1 B2   the same for two builds, side by side

Prices are the ledger's own rates (its `ledger.rates`). Attention FLOPs grow with the sequence
length, not only tokens: give the runs the row's sequence length, or read attention's time
from the GPU.
"""
import json
import sys
from collections import defaultdict


def load(path):
    with open(path) as f:
        lines = [l for l in f if l.strip().startswith("{")]
    return json.loads(lines[-1])


def entries(run):
    out = defaultdict(lambda: [0.0, 0.0, 0.0])
    for o in run["ledger"]["ops"]:
        k = (o["class"], o["phase"], o["node"], o["op"], o["via"])
        v = out[k]
        v[0] += o["count"]
        v[1] += o["bytes"]
        v[2] += o["flops"]
    return out


def extrapolate(one, two, layers, tokens):
    a, b = entries(one), entries(two)
    scale = tokens / (one["seq"] * one["batch"])
    out = {}
    for k in set(a) | set(b):
        va, vb = a.get(k, [0.0] * 3), b.get(k, [0.0] * 3)
        per_layer = [y - x for x, y in zip(va, vb)]
        rest = [x - p for x, p in zip(va, per_layer)]
        # Counts scale with layers only; bytes and FLOPs with tokens too.
        out[k] = [rest[0] + layers * per_layer[0]] + [scale * (r + layers * p) for r, p in zip(rest[1:], per_layer[1:])]
    return out


def ms(rates, cls, count, nbytes, flops):
    """As gpu::ledger::Rates::ms."""
    if cls == "view":
        return 0.0
    mem = nbytes / (rates["bandwidth_tbs"] * 1e12) * 1e3
    rate = {"gemm": rates["gemm_tflops"], "attention": rates["attention_tflops"]}.get(cls)
    t = max(mem, flops / (rate * 1e12) * 1e3) if rate else mem
    return max(t, count * rates.get("kernel_floor_us", 0.0) * 1e-3)


def by_class(rows, rates):
    out = defaultdict(lambda: [0.0, 0.0, 0.0])
    for (cls, *_), (count, nbytes, flops) in rows.items():
        c = out[cls]
        c[0] += count
        c[1] += nbytes / 2**30
        c[2] += ms(rates, cls, count, nbytes, flops)
    return out


def table(columns, rates, top=25):
    names = [n for n, _ in columns]
    classes = [by_class(rows, rates) for _, rows in columns]
    head = "| class | " + " | ".join(f"{n}: count | GiB | ms" for n in names) + " |"
    print(head)
    print("|" + "---|" * (1 + 3 * len(names)))
    order = ["gemm", "attention", "fused", "elementwise", "copy", "reduction", "view"]
    for cls in order:
        if not any(cls in c for c in classes):
            continue
        cells = []
        for c in classes:
            count, gib, t = c.get(cls, [0, 0, 0])
            cells.append(f"{count:,.0f} | {gib:.1f} | {t:.2f}")
        print(f"| {cls} | " + " | ".join(cells) + " |")
    cells = []
    for c in classes:
        t = sum(v[2] for k, v in c.items() if k not in ("gemm", "attention"))
        cells.append(f"| | {t:.2f}")
    print("| non-GEMM, non-attention ms | " + " ".join(cells).lstrip("| ") + " |")
    print()
    rows = columns[-1][1]
    ranked = sorted(rows.items(), key=lambda kv: -ms(rates, kv[0][0], *kv[1]))
    print(f"top entries ({names[-1]}): ms | count | GiB | class | phase | node | op | via")
    for (cls, phase, node, op, via), (count, nbytes, flops) in ranked[:top]:
        if cls in ("view",):
            continue
        print(f"  {ms(rates, cls, count, nbytes, flops):8.3f} | {count:6.0f} | {nbytes / 2**30:7.3f} | {cls} | {phase} | {node} | {op} | {via}")


def main(argv):
    if len(argv) >= 3 and argv[0] == "--row":
        layers, tokens = (int(x) for x in argv[1].split(","))
        one, two = load(argv[2]), load(argv[3])
        columns = [("A", extrapolate(one, two, layers, tokens))]
        if len(argv) == 7 and argv[4] == "--versus":
            columns = [("before", columns[0][1]), ("after", extrapolate(load(argv[5]), load(argv[6]), layers, tokens))]
        table(columns, one["ledger"]["rates"])
    elif len(argv) == 1:
        run = load(argv[0])
        table([("ledger", entries(run))], run["ledger"]["rates"])
    else:
        sys.exit(__doc__)


if __name__ == "__main__":
    main(sys.argv[1:])
