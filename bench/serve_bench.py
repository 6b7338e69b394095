#!/usr/bin/env python3
"""Load generator and table of bench/serve_vs_hf.sh: the same prompts (token ids drawn from a
seed) sent at each concurrency to `ftx serve` over HTTP (streamed, for time to first token) or to
transformers' continuous-batching manager in process; one JSON line per (system, concurrency).

  serve_bench.py ftx   --url URL --model NAME --vocab V --conc "1 8 64" --prompt 512 --new 256 --label L
  serve_bench.py hf    --model-dir DIR        --vocab V --conc "1 8 64" --prompt 512 --new 256 --label L
  serve_bench.py table RESULTS.jsonl

The random checkpoint's tokenizer (`ftx bench random-model`) maps token i to the word "t{i}", so
the text prompt ftx receives tokenizes to exactly the ids transformers is given.
Closed loop: `conc` requests in flight, a new one sent as one finishes, `requests` in all.
"""
import argparse
import json
import random
import sys
import threading
import time
import urllib.request


# Paged attention implementations, best first (transformers 5 names, then 4.5x's).
ATTN_CHOICES = ["paged|sdpa", "sdpa_paged", "paged|eager"]


def prompts(n, length, vocab, seed):
    rng = random.Random(seed)
    return [[rng.randrange(1, vocab) for _ in range(length)] for _ in range(n)]


def pct(values, q):
    """Nearest-rank percentile (as ftx's own load test)."""
    if not values:
        return None
    v = sorted(values)
    k = max(1, min(len(v), int(-(-q * len(v) // 1))))
    return v[k - 1]


def summary(system, label, conc, n, ttfts, tokens, wall, errors, attn=None):
    return {
        "system": system, "attn": attn, "shape": label, "concurrency": conc, "requests": n, "ok": len(ttfts),
        "errors": len(errors), "first_error": errors[0] if errors else None,
        "output_tokens": tokens, "wall_s": round(wall, 3),
        "output_tokens_per_s": round(tokens / wall, 1) if wall > 0 else 0.0,
        "ttft_p50_ms": None if not ttfts else round(1000 * pct(ttfts, 0.5), 1),
        "ttft_p99_ms": None if not ttfts else round(1000 * pct(ttfts, 0.99), 1),
    }


def ftx_one(url, model, ids, new, timeout):
    """One streamed completion: (seconds to the first text, completion tokens)."""
    body = {"model": model, "prompt": " ".join(f"t{i}" for i in ids), "max_tokens": new, "temperature": 0,
            "stream": True, "stream_options": {"include_usage": True}}
    req = urllib.request.Request(url + "/v1/completions", data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    start = time.perf_counter()
    first, tokens, chunks = None, None, 0
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        for raw in resp:
            line = raw.decode().strip()
            if not line.startswith("data:"):
                continue
            data = line[5:].strip()
            if data == "[DONE]":
                break
            ev = json.loads(data)
            if "error" in ev:
                raise RuntimeError(json.dumps(ev["error"]))
            for c in ev.get("choices") or []:
                if c.get("text"):
                    chunks += 1
                    if first is None:
                        first = time.perf_counter() - start
            if ev.get("usage"):
                tokens = ev["usage"]["completion_tokens"]
    if first is None:
        raise RuntimeError("the stream ended without text")
    return first, tokens if tokens is not None else chunks


def run_ftx(a):
    url = a.url.rstrip("/")
    for conc in a.conc:
        n = a.requests or max(2 * conc, 8)
        ps = prompts(n, a.prompt, a.vocab, a.seed + conc)
        ftx_one(url, a.model, ps[0][:16], 4, a.timeout)  # warm-up, not timed
        lock, nxt, ttfts, toks, errors = threading.Lock(), [0], [], [0], []

        def worker():
            while True:
                with lock:
                    i = nxt[0]
                    nxt[0] += 1
                if i >= n:
                    return
                try:
                    t, k = ftx_one(url, a.model, ps[i], a.new, a.timeout)
                    with lock:
                        ttfts.append(t)
                        toks[0] += k
                except Exception as e:  # noqa: BLE001 - reported in the result line
                    with lock:
                        errors.append(f"request {i}: {e}")

        t0 = time.perf_counter()
        threads = [threading.Thread(target=worker, daemon=True) for _ in range(conc)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        print(json.dumps(summary("ftx", a.label, conc, n, ttfts, toks[0], time.perf_counter() - t0, errors)), flush=True)


def run_hf(a):
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, GenerationConfig

    device = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[a.dtype]
    # The paged attention continuous batching is built for, by the names transformers 5
    # ("paged|sdpa", ...) and 4.5x ("sdpa_paged") give it; the default only when neither loads.
    model, attn = None, None
    for name in ATTN_CHOICES:
        try:
            model = AutoModelForCausalLM.from_pretrained(a.model_dir, dtype=dtype, attn_implementation=name)
            attn = name
            break
        except (ValueError, ImportError, KeyError) as e:
            print(f"transformers: attn_implementation={name!r} unavailable ({e})", file=sys.stderr)
    if model is None:
        model = AutoModelForCausalLM.from_pretrained(a.model_dir, dtype=dtype)
        attn = getattr(model.config, "_attn_implementation", None) or "default"
    print(f"transformers: attention {attn}", file=sys.stderr)
    model = model.to(device).eval()
    gen = GenerationConfig(max_new_tokens=a.new, do_sample=False, eos_token_id=-1, pad_token_id=0)
    manager = model.init_continuous_batching(generation_config=gen)
    if hasattr(manager, "warmup") and device != "cpu":
        try:
            manager.warmup()
        except Exception as e:  # noqa: BLE001 - warm-up is an optimisation
            print(f"transformers warm-up skipped: {e}", file=sys.stderr)
    manager.start()
    # One short request first, not timed (as for ftx): lazy initialisation happens here.
    manager.add_request([1, 2, 3, 4], request_id="warmup", max_new_tokens=4)
    while True:
        r = manager.get_result(timeout=a.timeout)
        if r is None:
            raise SystemExit("transformers: the warm-up request never finished")
        if r.request_id == "warmup" and r.is_finished():
            break
    print(f"transformers {transformers.__version__} continuous batching on {device}", file=sys.stderr)
    try:
        for conc in a.conc:
            n = a.requests or max(2 * conc, 8)
            ps = prompts(n, a.prompt, a.vocab, a.seed + conc)
            sent, first, ttfts, toks, errors = {}, {}, [], 0, []
            nxt, done = 0, 0

            def submit(i):
                rid = f"c{conc}-r{i}"
                sent[rid] = time.perf_counter()
                manager.add_request(ps[i], request_id=rid, max_new_tokens=a.new, streaming=True)

            t0 = time.perf_counter()
            while nxt < min(conc, n):
                submit(nxt)
                nxt += 1
            deadline = t0 + a.timeout
            while done < n:
                if time.perf_counter() > deadline:
                    errors.append(f"timed out after {a.timeout} s with {n - done} requests unfinished")
                    break
                r = manager.get_result(timeout=1.0)
                if r is None:
                    if not getattr(manager, "is_running", lambda: True)():
                        errors.append("the continuous-batching thread stopped")
                        break
                    continue
                rid = r.request_id
                if rid not in sent:
                    continue  # a warm-up leftover
                if rid not in first and r.generated_tokens:
                    first[rid] = time.perf_counter() - sent[rid]
                if r.is_finished():
                    done += 1
                    if r.error:
                        errors.append(f"{rid}: {r.error}")
                    else:
                        toks += len(r.generated_tokens)
                        ttfts.append(first.get(rid, time.perf_counter() - sent[rid]))
                    if nxt < n:
                        submit(nxt)
                        nxt += 1
            print(json.dumps(summary("hf", a.label, conc, n, ttfts, toks, time.perf_counter() - t0, errors, attn)), flush=True)
    finally:
        try:
            manager.stop(block=True, timeout=30)
        except TypeError:  # older signatures
            manager.stop()


def table(path):
    rows = [json.loads(l) for l in open(path) if l.strip().startswith("{")]
    by = {}
    for r in rows:
        by.setdefault((r["shape"], r["concurrency"]), {})[r["system"]] = r
    fmt = lambda v: "-" if v is None else (f"{v:,.0f}" if isinstance(v, (int, float)) else str(v))
    head = f"{'shape':<14}{'conc':>5}{'ftx tok/s':>12}{'HF tok/s':>12}{'ftx/HF':>8}{'ftx TTFT p50/p99 ms':>22}{'HF TTFT p50/p99 ms':>22}"
    print(head)
    print("-" * len(head))
    for (shape, conc), s in sorted(by.items(), key=lambda kv: (kv[0][0], kv[0][1])):
        f, h = s.get("ftx"), s.get("hf")
        tf = f and f["ok"] and f["output_tokens_per_s"]
        th = h and h["ok"] and h["output_tokens_per_s"]
        ratio = f"{tf / th:.2f}x" if tf and th else "-"
        ttf = f"{fmt(f['ttft_p50_ms'])} / {fmt(f['ttft_p99_ms'])}" if f else "-"
        tth = f"{fmt(h['ttft_p50_ms'])} / {fmt(h['ttft_p99_ms'])}" if h else "-"
        print(f"{shape:<14}{conc:>5}{fmt(tf or None):>12}{fmt(th or None):>12}{ratio:>8}{ttf:>22}{tth:>22}")
    for attn in sorted({r["attn"] for r in rows if r.get("system") == "hf" and r.get("attn")}):
        print(f"HF attention: {attn}")
    for r in rows:
        if r.get("errors"):
            print(f"! {r['system']} {r['shape']} c={r['concurrency']}: {r['errors']} failed; first: {r['first_error']}")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("mode", choices=["ftx", "hf", "table"])
    p.add_argument("results", nargs="?")
    p.add_argument("--url")
    p.add_argument("--model")
    p.add_argument("--model-dir")
    p.add_argument("--device")
    p.add_argument("--dtype", default="bf16")
    p.add_argument("--vocab", type=int)
    p.add_argument("--conc", type=lambda s: [int(x) for x in s.split()], default=[1, 8, 64])
    p.add_argument("--requests", type=int, default=0, help="per concurrency (default: max(2 x conc, 8))")
    p.add_argument("--prompt", type=int, default=512)
    p.add_argument("--new", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--label", default="model")
    p.add_argument("--timeout", type=float, default=900, help="seconds per request (ftx) or per concurrency level (hf)")
    a = p.parse_args()
    if a.mode == "table":
        if not a.results:
            p.error("table needs the results file")
        return table(a.results)
    if not a.vocab:
        p.error("--vocab is required")
    if a.mode == "ftx":
        if not (a.url and a.model):
            p.error("ftx needs --url and --model")
        return run_ftx(a)
    if not a.model_dir:
        p.error("hf needs --model-dir")
    return run_hf(a)


if __name__ == "__main__":
    main()
