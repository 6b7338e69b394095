#!/usr/bin/env python3
"""Tables from `ftx bench train --ledger` JSON lines (issue 15).

    ledger_table.py ONE.json
        per class and the top entries of one ledger
    ledger_table.py --row L,N,T L1N1.json L2N1.json L1N2.json L2N2.json
        the ledger of an L-layer model on N tokens in sequences of T, from four small runs of one
        shape in sequences of their own length (batch 1): 1 and 2 layers, each at two lengths
        N1 < N2. Each entry's count, bytes and FLOPs are taken as a + b·layers + c·tokens +
        d·layers·tokens (weight-sized work — the frozen weights the GEMMs read, the adapters, the
        optimizer — has no token term; activations have no constant), solved exactly from the
        four runs (counts: the longer runs', per layer). Attention FLOPs grow with tokens × sequence length: their token terms are
        scaled by T / the run's length as well.
    ledger_table.py --row L,N,T A1 A2 A3 A4 --versus B1 B2 B3 B4
        the same for two builds (or settings), side by side, A as "before"

Prices are the ledger's own rates (its `ledger.rates`).
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


def extrapolate(runs, layers, tokens, seq):
    """runs: [(1 layer, N1), (2 layers, N1), (1 layer, N2), (2 layers, N2)] ledgers."""
    es = [entries(r) for r in runs]
    n1 = runs[0]["seq"] * runs[0]["batch"]
    n2 = runs[2]["seq"] * runs[2]["batch"]
    assert runs[1]["seq"] * runs[1]["batch"] == n1 and runs[3]["seq"] * runs[3]["batch"] == n2 and n1 != n2, "two runs at each of two lengths"
    assert [r["layers"] for r in runs] == [1, 2, 1, 2], "1 and 2 layers at each length"
    out = {}
    for k in set().union(*es):
        v = [e.get(k, [0.0] * 3) for e in es]
        row = []
        for j in range(3):
            p1, p2 = v[1][j] - v[0][j], v[3][j] - v[2][j]  # per layer at N1, N2
            r1, r2 = v[0][j] - p1, v[2][j] - p2  # the rest at N1, N2
            at = lambda a, b: a + (b - a) * (tokens - n1) / (n2 - n1)
            if j == 0:
                # Counts: the longer runs' (only the head's chunks grow with tokens).
                at = lambda a, b: b
            if k[0] == "attention" and j == 2:
                # FLOPs ∝ tokens × sequence length: per token, ∝ the length.
                at = lambda a, b: a * tokens * seq / (n1 * n1) if n2 != n1 else a
            row.append(at(r1, r2) + layers * at(p1, p2))
        out[k] = row
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
    if len(argv) >= 6 and argv[0] == "--row":
        layers, tokens, seq = (int(x) for x in argv[1].split(","))
        a = [load(p) for p in argv[2:6]]
        columns = [("ledger", extrapolate(a, layers, tokens, seq))]
        if len(argv) == 11 and argv[6] == "--versus":
            b = [load(p) for p in argv[7:11]]
            columns = [("before", columns[0][1]), ("after", extrapolate(b, layers, tokens, seq))]
        table(columns, a[0]["ledger"]["rates"])
    elif len(argv) == 1:
        run = load(argv[0])
        table([("ledger", entries(run))], run["ledger"]["rates"])
    else:
        sys.exit(__doc__)


if __name__ == "__main__":
    main(sys.argv[1:])
