"""One table from the JSON lines of ftx bench train and the peers' scripts: tokens/s, × HF+PEFT
(same method and checkpointing), peak GiB (allocated, as torch.cuda.max_memory_allocated), MFU
and the loss at the first and last step (they must agree between systems).

`table.py --families results.jsonl`: bench/families_vs_hf.sh's table instead (ftx and HF+PEFT
paired by shape, layers, batch and variant; what each trained; the MoE's expert GEMM share)."""
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


def families(path):
    rs = [json.loads(line) for line in open(path) if line.strip().startswith("{")]
    key = lambda r: (r["shape"], r.get("layers"), r["batch"], r["seq"], r.get("variant"))
    hf = {key(r): r for r in rs if r["system"] == "hf+peft"}
    print("| shape | layers | batch | system | trained | trainable params | tokens/s | ftx ÷ HF | peak GiB | peak ftx ÷ HF | expert GEMM share | loss first → last |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rs:
        base = hf.get(key(r))
        ftx = r["system"] != "hf+peft"
        ratio = lambda f: f"{r[f] / base[f]:.2f}" if ftx and base and r.get(f) and base.get(f) else "–"
        public = r.get("public_layers") or (base or {}).get("public_layers")
        layers = f"{r.get('layers')} of {public}" if public and r.get("layers") != public else str(r.get("layers", "–"))
        trained = r.get("targets") or "–"
        if isinstance(trained, list):
            trained = ", ".join(trained)
        if not ftx:
            trained += f" ({r.get('adapter_dtype')} adapters; attention: {r.get('attn_implementation')}"
            trained += f", experts: {r['experts_implementation']})" if r.get("experts_implementation") else ")"
        peak = f"{r['peak_gib']:.1f}" if r.get("peak_gib") is not None else "–"
        share = f"{100 * r['expert_gemm_share']:.0f}%" if r.get("expert_gemm_share") is not None else "–"
        loss = f"{r['first_loss']:.3f} → {r['last_loss']:.3f}"
        print(f"| {r['shape']} | {layers} | {r['batch']} | {r['system']} | {trained} | {r['trainable_params']:,} | "
              f"{r['tokens_per_s']:,.0f} | {ratio('tokens_per_s')} | {peak} | {ratio('peak_gib')} | {share} | {loss} |")


if __name__ == "__main__":
    if sys.argv[1] == "--families":
        families(sys.argv[2])
    else:
        main(sys.argv[1])
