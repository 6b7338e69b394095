"""Sum the last whole training step of Nsight Compute traces by kernel kind.

    python3 bench/kernel_table.py OUT/ftx_fused.csv OUT/unsloth.csv

Each CSV is `ncu --csv --page raw --metrics gpu__time_duration.sum` over a run of several
identical steps. The step is found as the shortest period P (≥ MIN_PERIOD kernels) such that the
last 2·P kernel names repeat with period P; its kernels are then grouped by kind.
"""
import csv
import re
import sys
from collections import defaultdict

MIN_PERIOD = 400
KINDS = [  # matched against the name before its argument list, first match wins
    ("attention", r"flash|fmha|attention|sdpa|dot_do_o|convert_dq"),
    ("gemm", r"gemm|cutlass|xmma|nvjet|wgmma|splitKreduce"),
    ("cross-entropy/softmax", r"softmax|cross_entropy|nll_loss|_fl_|_fg_kernel"),
    ("norm", r"rms|layer_norm|layernorm"),
    ("rope", r"rope"),
    ("swiglu/silu", r"silu|swiglu|sigmoid"),
    ("optimizer", r"adam|multi_tensor"),
    ("reduce", r"reduce|Reduce|scan::|select::"),
    ("copy/cast", r"direct_copy|bfloat16_copy|CatArray|gather|scatter|FillFunctor|index"),
    ("elementwise", r"elementwise|Functor|triton|pointwise|neg_kernel|exp_kernel"),
]


def rows(path):
    with open(path, newline="") as f:
        lines = [l for l in f if l.startswith('"')]
    reader = csv.DictReader(lines)
    out = []
    for r in reader:
        t = r.get("gpu__time_duration.sum", "")
        try:
            out.append((r["Kernel Name"], float(t.replace(",", ""))))
        except ValueError:
            continue  # the units row
    return out


def last_step(ks):
    names = [n for n, _ in ks]
    for p in range(MIN_PERIOD, len(names) // 2 + 1):
        if names[-p:] == names[-2 * p:-p]:
            return ks[-p:]
    return None


def kind(name):
    head = re.sub(r"\(.*", "", name).replace("nocast", "")
    for k, pat in KINDS:
        if re.search(pat, head, re.I):
            return k
    return "other"


def main(paths):
    for path in paths:
        ks = rows(path)
        step = last_step(ks)
        print(f"== {path}: {len(ks)} kernels traced")
        if not step:
            print("   no repeating step found")
            continue
        unit = 1e-6  # ncu --print-units base: nanoseconds
        total = sum(t for _, t in step) * unit
        by_kind, by_name = defaultdict(lambda: [0, 0.0]), defaultdict(lambda: [0, 0.0])
        for n, t in step:
            by_kind[kind(n)][0] += 1
            by_kind[kind(n)][1] += t * unit
            short = re.sub(r"\(.*", "", n)[:110]
            by_name[short][0] += 1
            by_name[short][1] += t * unit
        print(f"   one step: {len(step)} kernels, {total:.1f} ms of kernel time")
        for k, (c, t) in sorted(by_kind.items(), key=lambda x: -x[1][1]):
            print(f"   {k:24s} {c:6d} kernels {t:8.2f} ms {100 * t / total:5.1f}%")
        print("   top kernels:")
        for n, (c, t) in sorted(by_name.items(), key=lambda x: -x[1][1])[:25]:
            print(f"   {t:8.2f} ms {c:5d}x  {n}")


if __name__ == "__main__":
    main(sys.argv[1:])
