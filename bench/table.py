"""One table from the JSON lines of ftx bench train and the peers' scripts: tokens/s, × HF+PEFT
(same method and checkpointing), peak GiB (allocated, as torch.cuda.max_memory_allocated), MFU
and the loss at the first and last step (they must agree between systems)."""
import json, sys

FLOPS = 790e12  # the H200's measured dense bf16 matmul rate


def rows(path):
    for line in open(path):
        line = line.strip()
        if not line.startswith("{"):
            continue
        r = json.loads(line)
        losses = r.get("loss_first_last") or [r.get("first_loss"), r.get("last_loss")]
        yield {
            "system": r.get("system", "?"),
            "method": r.get("method", "lora"),  # the peers' script runs LoRA only
            "shape": r.get("shape", "llama-3.2-1b"),
            "gc": bool(r.get("grad_checkpointing")),
            # ftx says "offload"; Unsloth's checkpointing always offloads to the host.
            "ckpt": "offloaded" if r.get("grad_checkpointing") == "offload" or (r.get("system") == "unsloth" and r.get("grad_checkpointing")) else ("on" if r.get("grad_checkpointing") else "off"),
            "tps": float(r["tokens_per_s"]),
            "peak": r.get("peak_gib"),
            "mfu": r.get("mfu"),
            "loss": losses,
            "batch": r.get("batch", 8),
            "seq": r.get("seq", 2048),
        }


def main(path):
    rs = list(rows(path))
    hf = {(r["shape"], r["method"], r["gc"]): r["tps"] for r in rs if r["system"] in ("hf+peft", "hf-transformers", "hf-transformers+peft")}
    print(f"| system | shape | method | ckpt | tokens/s | × HF | peak GiB | MFU | loss first → last |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rs:
        base = hf.get((r["shape"], r["method"], r["gc"]))
        ratio = f"{r['tps'] / base:.2f}" if base else "–"
        peak = f"{r['peak']:.1f}" if r["peak"] is not None else "–"
        mfu = f"{100 * r['mfu']:.0f}%" if r["mfu"] else "–"
        l0, l1 = (r["loss"] + [None, None])[:2]
        loss = f"{l0:.3f} → {l1:.3f}" if l0 is not None and l1 is not None else "–"
        shape = r["shape"] if r.get("batch", 8) == 8 else f"{r['shape']} bs{r['batch']}"
        if r.get("seq", 2048) != 2048:
            shape += f" seq {r['seq']}"
        print(f"| {r['system']} | {shape} | {r['method']} | {r['ckpt']} | {r['tps']:,.0f} | {ratio} | {peak} | {mfu} | {loss} |")


if __name__ == "__main__":
    main(sys.argv[1])
