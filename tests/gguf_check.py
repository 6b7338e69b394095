"""Checks a GGUF file that `ftx export --format gguf` wrote, with the `gguf` Python package
(llama.cpp's gguf-py) as the independent reader.

    python tests/gguf_check.py check FILE.gguf REF_DIR EXPECT.json
        REF_DIR: the same model as a merged fp32 Hugging Face checkpoint (config.json +
        safetensors). Every GGUF tensor is dequantised with gguf.quants.dequantize and
        compared with the reference (HF names mapped, Q/K rows permuted and MoE experts
        stacked here, as llama.cpp's convert_hf_to_gguf.py does), within a tolerance per
        type; Q8_0, Q5_0 and Q5_1 bytes must equal gguf.quants.quantize's; k-quant bytes must
        equal ggml's own quantize_row_*_ref (libggml from llama-cpp-python, or $FTX_LIBGGML;
        the check fails when neither is there).
        EXPECT.json: metadata key -> expected value.
    python tests/gguf_check.py vocab FILE.gguf
        Every tokenizer.* metadata value, as gguf-py reads it, printed as one JSON object.
    python tests/gguf_check.py generate FILE.gguf IDS N
        Greedy continuation of the comma-separated token ids by llama.cpp
        (llama-cpp-python), printed as JSON with the prompt's last-position logits and
        llama.cpp's own description of the model it loaded (its architecture name first).
        Fails when llama-cpp-python is not installed (tests/env.sh installs it).

Prints one JSON line; exits 1 on any mismatch.
"""

import ctypes
import glob
import json
import os
import re
import sys

import numpy as np
import gguf
from gguf import GGMLQuantizationType as T

# Relative RMS error allowed per type (error RMS / reference RMS, per tensor).
TOLERANCE = {T.F32: 0.0, T.F16: 1e-3, T.Q8_0: 0.012, T.Q6_K: 0.035, T.Q5_K: 0.06,
             T.Q5_0: 0.08, T.Q5_1: 0.07, T.Q4_K: 0.12}
BYTE_EXACT_PY = {T.Q8_0, T.Q5_0, T.Q5_1}
GGML_REF = {T.Q4_K: "quantize_row_q4_K_ref", T.Q5_K: "quantize_row_q5_K_ref",
            T.Q6_K: "quantize_row_q6_K_ref"}


def read_safetensors(path):
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
        data = f.read()
    dtypes = {"F32": np.float32, "F16": np.float16}
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        a, b = info["data_offsets"]
        out[name] = np.frombuffer(data[a:b], dtype=dtypes[info["dtype"]]).reshape(info["shape"]).astype(np.float32)
    return out


def reference_tensors(ref_dir):
    tensors = {}
    for f in sorted(glob.glob(os.path.join(ref_dir, "*.safetensors"))):
        tensors.update(read_safetensors(f))
    cfg = json.load(open(os.path.join(ref_dir, "config.json")))
    arch = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2",
            "Qwen3ForCausalLM": "qwen3", "Gemma2ForCausalLM": "gemma2",
            "Gemma3ForCausalLM": "gemma3", "Phi3ForCausalLM": "phi3",
            "MixtralForCausalLM": "llama", "Qwen3MoeForCausalLM": "qwen3moe"}[cfg["architectures"][0]]
    n_head, n_kv = cfg["num_attention_heads"], cfg.get("num_key_value_heads", cfg["num_attention_heads"])
    names = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
             "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "self_attn.q_norm": "attn_q_norm",
             "self_attn.k_norm": "attn_k_norm", "post_attention_layernorm": "ffn_norm",
             "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
             # Phi-3's packed projections, kept packed (convert_hf_to_gguf's phi3).
             "self_attn.qkv_proj": "attn_qkv", "mlp.gate_up_proj": "ffn_up",
             # A MoE layer's router (Mixtral's Hub name; Qwen3-MoE's and transformers 5's).
             "block_sparse_moe.gate": "ffn_gate_inp", "mlp.gate": "ffn_gate_inp"}
    gemma = arch in ("gemma2", "gemma3")
    if gemma:
        names.update({"post_attention_layernorm": "post_attention_norm",
                      "pre_feedforward_layernorm": "ffn_norm",
                      "post_feedforward_layernorm": "post_ffw_norm"})

    # llama.cpp's gemma2/gemma3 scale scores by 1/sqrt(head_dim) (27B: 1/sqrt(hidden/heads)),
    # whatever query_pre_attn_scalar says: ftx folds the difference into the queries.
    gemma_query_fold = 1.0
    if gemma and cfg.get("query_pre_attn_scalar"):
        head_dim = cfg.get("head_dim") or cfg["hidden_size"] // n_head
        is_27b = cfg["num_hidden_layers"] == (46 if arch == "gemma2" else 62)
        assumed = cfg["hidden_size"] / n_head if is_27b else head_dim
        gemma_query_fold = float(np.sqrt(assumed / cfg["query_pre_attn_scalar"]))

    def permute(w, heads):
        return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)

    out = {}
    # MoE experts, stacked into one [experts, rows, cols] tensor per projection as
    # convert_hf_to_gguf does: per-expert tensors (Hub layout) in expert order, or
    # transformers 5's fused gate_up_proj (gate rows first) / down_proj.
    experts = {}
    for name in list(tensors):
        m = re.fullmatch(r"model\.layers\.(\d+)\.(?:block_sparse_moe|mlp)\.experts\.(\d+)\."
                         r"(w1|w3|w2|gate_proj|up_proj|down_proj)\.weight", name)
        if m:
            kind = {"w1": "gate", "gate_proj": "gate", "w3": "up", "up_proj": "up"}.get(m[3], "down")
            experts.setdefault((m[1], kind), {})[int(m[2])] = tensors.pop(name)
            continue
        m = re.fullmatch(r"model\.layers\.(\d+)\.mlp\.experts\.(gate_up_proj|down_proj)", name)
        if m:
            w = tensors.pop(name)
            if m[2] == "down_proj":
                experts[(m[1], "down")] = dict(enumerate(w))
            else:
                half = w.shape[1] // 2
                experts[(m[1], "gate")] = dict(enumerate(w[:, :half]))
                experts[(m[1], "up")] = dict(enumerate(w[:, half:]))
    for (layer, kind), by_expert in experts.items():
        out[f"blk.{layer}.ffn_{kind}_exps.weight"] = np.stack([by_expert[x] for x in sorted(by_expert)])
    for name, w in tensors.items():
        if name == "model.embed_tokens.weight":
            g = "token_embd.weight"
        elif name == "model.norm.weight":
            g = "output_norm.weight"
        elif name == "lm_head.weight":
            g = "output.weight"
        else:
            _, _, layer, rest = name.split(".", 3)
            module, kind = rest.rsplit(".", 1)
            g = f"blk.{layer}.{names[module]}.{kind}"
            if arch == "llama" and module == "self_attn.q_proj":
                w = permute(w, n_head)
            elif arch == "llama" and module == "self_attn.k_proj":
                w = permute(w, n_kv)
        if gemma and name.endswith("norm.weight"):
            # convert_hf_to_gguf stores Gemma's (1 + w) RMSNorm weights with the 1 added.
            w = w + 1
        if gemma and g.endswith(".attn_q_norm.weight" if arch == "gemma3" else ".attn_q.weight"):
            w = w * gemma_query_fold
        out[g] = w
    # LongRoPE's factor lists as convert_hf_to_gguf writes them (config.json's, fp32).
    rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    if arch == "phi3" and rope.get("long_factor"):
        out["rope_factors_long.weight"] = np.array(rope["long_factor"], dtype=np.float32)
        out["rope_factors_short.weight"] = np.array(rope["short_factor"], dtype=np.float32)
    return out, cfg, arch


def ggml_library():
    """libggml from llama-cpp-python, or the one $FTX_LIBGGML names (a llama.cpp build's
    libggml-base.so)."""
    cands = [os.environ["FTX_LIBGGML"]] if os.environ.get("FTX_LIBGGML") else []
    try:
        import llama_cpp
        libdir = os.path.join(os.path.dirname(llama_cpp.__file__), "lib")
        cands += glob.glob(os.path.join(libdir, "libggml-base.*")) + glob.glob(os.path.join(libdir, "libggml.*"))
    except ImportError:
        pass
    for cand in cands:
        try:
            lib = ctypes.CDLL(cand)
            lib.quantize_row_q4_K_ref  # noqa: B018  (raises if absent)
            return lib
        except (OSError, AttributeError):
            continue
    return None


def ggml_quantize(lib, qtype, x):
    x = np.ascontiguousarray(x.reshape(-1), dtype=np.float32)
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    out = np.zeros(x.size // block * size, dtype=np.uint8)
    fn = getattr(lib, GGML_REF[qtype])
    fn.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64]
    fn(x.ctypes.data, out.ctypes.data, x.size)
    return out


def field_value(field):
    return field.contents()


def check(path, ref_dir, expect_path):
    reader = gguf.GGUFReader(path)
    refs, cfg, arch = reference_tensors(ref_dir)
    problems, report = [], {"tensors": {}}
    expect = json.load(open(expect_path))
    for key, want in expect.items():
        # "len:KEY" compares an array's length, "at:N:KEY" its N-th element.
        parts = key.split(":")
        field = reader.get_field(parts[-1])
        if field is None:
            problems.append(f"metadata {parts[-1]} missing")
            continue
        got = field_value(field)
        if parts[0] == "len":
            got = len(got)
        elif parts[0] == "at":
            got = got[int(parts[1])]
        ok = abs(got - want) <= 1e-6 * max(1, abs(want)) if isinstance(want, float) else got == want
        if not ok:
            problems.append(f"metadata {key}: {got!r} != {want!r}")
    lib = ggml_library()
    if lib is not None:
        report["kquant_bytes"] = "checked against libggml quantize_row_*_ref"
    elif any(t.tensor_type in GGML_REF for t in reader.tensors):
        problems.append("k-quant bytes cannot be checked: no libggml (llama-cpp-python is not installed and "
                        "FTX_LIBGGML is unset); run tests/env.sh, which installs llama-cpp-python")
    seen = set()
    for t in reader.tensors:
        seen.add(t.name)
        if t.name == "rope_freqs.weight":
            continue
        ref = refs.get(t.name)
        if ref is None:
            problems.append(f"{t.name}: not in the reference checkpoint")
            continue
        shape = tuple(int(d) for d in reversed(t.shape.tolist()))
        if shape != ref.shape:
            problems.append(f"{t.name}: shape {shape} != {ref.shape}")
            continue
        deq = gguf.quants.dequantize(t.data, t.tensor_type).reshape(ref.shape).astype(np.float32)
        rms = float(np.sqrt(np.mean(ref ** 2))) or 1.0
        rel = float(np.sqrt(np.mean((deq - ref) ** 2))) / rms
        tol = TOLERANCE[t.tensor_type]
        entry = {"type": t.tensor_type.name, "rel_rmse": rel}
        if rel > tol:
            problems.append(f"{t.name} ({t.tensor_type.name}): relative RMS error {rel:.4g} > {tol}")
        raw = np.asarray(t.data).reshape(-1).view(np.uint8)
        if t.tensor_type == T.F16:
            entry["bytes_equal_numpy_f16"] = bool(np.array_equal(raw, ref.astype(np.float16).reshape(-1).view(np.uint8)))
            if not entry["bytes_equal_numpy_f16"]:
                problems.append(f"{t.name}: F16 bytes differ from numpy's float16 rounding")
        if t.tensor_type in BYTE_EXACT_PY:
            want = gguf.quants.quantize(ref, t.tensor_type).reshape(-1).view(np.uint8)
            entry["bytes_equal_gguf_py"] = bool(np.array_equal(raw, want))
            if not entry["bytes_equal_gguf_py"]:
                problems.append(f"{t.name}: {t.tensor_type.name} bytes differ from gguf.quants.quantize")
        if lib is not None and t.tensor_type in GGML_REF:
            want = ggml_quantize(lib, t.tensor_type, ref)
            diff = int(np.count_nonzero(raw != want))
            entry["bytes_differing_from_ggml"] = diff
            if diff:
                problems.append(f"{t.name}: {diff} {t.tensor_type.name} bytes differ from ggml's reference quantiser")
        report["tensors"][t.name] = entry
    tied = cfg.get("tie_word_embeddings", False)
    for name in refs:
        if name not in seen and not (tied and name == "output.weight"):
            problems.append(f"{name}: missing from the GGUF")
    report["problems"] = problems
    print(json.dumps(report))
    return not problems


def generate(path, ids, n):
    try:
        import llama_cpp
    except ImportError:
        print("llama-cpp-python is not installed in this Python: run tests/env.sh, which builds it "
              "(pinned, CPU only) into the project venv", file=sys.stderr)
        return False
    llm = llama_cpp.Llama(model_path=path, n_ctx=256, logits_all=True, verbose=False, n_threads=1)
    # llama.cpp's own description of what it loaded: "<arch> <size> <ftype>" (llama_model_desc).
    desc = llm._model.desc()
    tokens = [int(x) for x in ids.split(",")]
    llm.eval(tokens)
    logits = np.array(llm.scores[llm.n_tokens - 1], dtype=np.float32)
    out = []
    for _ in range(int(n)):
        nxt = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        out.append(nxt)
        llm.eval([nxt])
    print(json.dumps({"desc": desc, "ids": out, "last_logits": logits.tolist()}))
    return True


def vocab(path):
    reader = gguf.GGUFReader(path)
    out = {name: field_value(field) for name, field in reader.fields.items() if name.startswith("tokenizer.")}
    print(json.dumps(out, default=lambda v: v.tolist() if hasattr(v, "tolist") else str(v)))
    return True


if __name__ == "__main__":
    mode = sys.argv[1]
    if mode == "vocab":
        sys.exit(0 if vocab(sys.argv[2]) else 1)
    ok = check(*sys.argv[2:5]) if mode == "check" else generate(*sys.argv[2:5])
    sys.exit(0 if ok else 1)
