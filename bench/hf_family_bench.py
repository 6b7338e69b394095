"""HF transformers + PEFT LoRA training steps on a random model of a public Gemma 2, Phi-4-mini or
Qwen3-MoE shape: the other half of bench/families_vs_hf.sh, next to `ftx bench train`.

    SHAPE=gemma-2-2b SEQ=2048 BS=4 STEPS=6 python3 bench/hf_family_bench.py

The model is built from a config written here with the public checkpoint's values (nothing is
downloaded or read from disk), directly on the device in bf16 (`AutoModelForCausalLM.from_config`
under `torch.device(DEVICE)`: the weights are allocated there and transformers' own init runs
there as `normal_` in place, seconds even for 30B parameters on a GPU). LoRA r=RANK α=2·RANK, no
dropout, `target_modules="all-linear"`; AdamW (lr 2e-4, no weight decay), gradients clipped at
norm 1 as ftx does; random token batches, the labels the inputs. Prints one JSON line with
`ftx bench train`'s field names.

Environment: SHAPE, SEQ (2048), BS (4), STEPS (6), WARMUP (2), RANK (16), DEVICE (cuda), DTYPE
(bf16; fp32 for CPU checks), LAYERS (the public count; fewer for a model that cannot fit),
ATTN (attn_implementation; default: whatever transformers picks for the model, reported),
MOE_TARGETS (MoE only: `experts` = what ftx's all-linear adapts, named explicitly: q/k/v/o
as modules, the router `mlp.gate.weight` and the fused expert tensors `mlp.experts.gate_up_proj`
/ `mlp.experts.down_proj` as PEFT `target_parameters` (PEFT ≥ 0.17; transformers 5 keeps the
experts as 3-D parameters and the router as no nn.Linear); `attention` = q/k/v/o only),
EXPERT_SHARE (1: on a MoE shape, also time as many steps with the
expert MLPs replaced by the identity and report `expert_gemm_share`, as ftx does; here the
expert adapters' AdamW updates drop out of those steps too, their gradients being None).
"""
import json, os, sys, time, types

import torch

# The public checkpoints' config.json values (google/gemma-2-2b, microsoft/Phi-4-mini-instruct,
# Qwen/Qwen3-30B-A3B). Phi-4-mini's LongRoPE factor lists are flat 1.0 here (as in ftx's shape
# table): 48 of them either way, and at SEQ ≤ 4096 only the short list is used.
CONFIGS = {
    "gemma-2-2b": dict(
        model_type="gemma2", hidden_size=2304, intermediate_size=9216, num_hidden_layers=26,
        num_attention_heads=8, num_key_value_heads=4, head_dim=256, vocab_size=256000,
        hidden_activation="gelu_pytorch_tanh", rms_norm_eps=1e-6, rope_theta=10000.0,
        sliding_window=4096, query_pre_attn_scalar=256, attn_logit_softcapping=50.0,
        final_logit_softcapping=30.0, max_position_embeddings=8192, tie_word_embeddings=True,
        attention_bias=False, attention_dropout=0.0, initializer_range=0.02,
        pad_token_id=0, bos_token_id=2, eos_token_id=1,
    ),
    "phi-4-mini": dict(
        model_type="phi3", hidden_size=3072, intermediate_size=8192, num_hidden_layers=32,
        num_attention_heads=24, num_key_value_heads=8, vocab_size=200064, hidden_act="silu",
        rms_norm_eps=1e-5, partial_rotary_factor=0.75, rope_theta=10000.0,
        rope_scaling={"type": "longrope", "short_factor": [1.0] * 48, "long_factor": [1.0] * 48},
        max_position_embeddings=131072, original_max_position_embeddings=4096,
        sliding_window=262144, tie_word_embeddings=True, attention_bias=False,
        resid_pdrop=0.0, embd_pdrop=0.0, attention_dropout=0.0, initializer_range=0.02,
        pad_token_id=199999, bos_token_id=199999, eos_token_id=199999,
    ),
    "qwen3-30b-a3b": dict(
        model_type="qwen3_moe", hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768,
        num_hidden_layers=48, num_attention_heads=32, num_key_value_heads=4, head_dim=128,
        vocab_size=151936, num_experts=128, num_experts_per_tok=8, norm_topk_prob=True,
        decoder_sparse_step=1, mlp_only_layers=[], hidden_act="silu", rms_norm_eps=1e-6,
        rope_theta=1000000.0, max_position_embeddings=40960, use_sliding_window=False,
        tie_word_embeddings=False, attention_bias=False, attention_dropout=0.0,
        output_router_logits=False, router_aux_loss_coef=0.001, initializer_range=0.02,
        bos_token_id=151643, eos_token_id=151645,
    ),
}
MOE = {"qwen3-30b-a3b"}


def env(name, default):
    return type(default)(os.environ.get(name, default))


def build(shape, layers, device, dtype, attn):
    from transformers import AutoConfig, AutoModelForCausalLM

    values = dict(CONFIGS[shape])
    values["num_hidden_layers"] = layers
    model_type = values.pop("model_type")
    cfg = AutoConfig.for_model(model_type, **values)
    kwargs = {"attn_implementation": attn} if attn else {}
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype, **kwargs)
    where = {p.device.type for p in model.parameters()}
    if where != {torch.device(device).type}:
        raise SystemExit(f"hf_family_bench: the model was built on {where}, not {device}")
    return model


ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]


def lora_config(shape, rank, moe_targets, fused=True, router=True):
    """LoRA r=rank, α=2·rank on all-linear; on the MoE, the same modules named explicitly (PEFT
    versions differ in what all-linear reaches on transformers 5's fused experts): attention
    as modules, the router and the fused expert tensors as `target_parameters`, gate_up at
    rank and α doubled, as PEFT's own v4 → v5 conversion adapts a separate gate and up."""
    from peft import LoraConfig

    common = dict(r=rank, lora_alpha=2 * rank, lora_dropout=0.0)
    if shape not in MOE:
        return LoraConfig(target_modules="all-linear", **common)
    if moe_targets == "attention":
        return LoraConfig(target_modules=ATTENTION, **common)
    if not fused:
        # Experts as nn.Linear modules (a transformers without fused experts): plain modules.
        return LoraConfig(target_modules=ATTENTION + ["gate", "gate_proj", "up_proj", "down_proj"], **common)
    params = (["mlp.gate.weight"] if router else []) + ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
    return LoraConfig(target_modules=ATTENTION, target_parameters=params, rank_pattern={r".*\.gate_up_proj": 2 * rank},
                      alpha_pattern={r".*\.gate_up_proj": 4 * rank}, **common)


def adapted(model):
    """What was adapted, as short names with counts (e.g. "q_proj×48", "experts.down_proj×48")."""
    from collections import Counter

    counts = Counter()
    for name, module in model.named_modules():
        if len(getattr(module, "lora_A", ())) > 0:
            param = getattr(module, "parameter_name", None)
            parts = name.split(".")
            # A ParamWrapper wrapping another is named …base_layer: name it by its owner.
            owner = next(p for p in reversed(parts) if p != "base_layer")
            counts[f"{owner}.{param}" if param else owner] += 1
    return [f"{k}×{v}" for k, v in sorted(counts.items())]


def identity_experts(self, hidden_states, top_k_index, top_k_weights):
    """The experts' MLPs replaced by the identity: each (token, expert) assignment adds
    w·x instead of w·MLP_e(x); the sort by expert, gather, weighting and scatter-add stay."""
    k = top_k_index.size(-1)
    _, perm = torch.sort(top_k_index.reshape(-1))
    token = perm // k
    gathered = hidden_states[token] * top_k_weights.reshape(-1)[perm, None].to(hidden_states.dtype)
    return torch.zeros_like(hidden_states).index_add_(0, token, gathered)


def main():
    shape = os.environ.get("SHAPE", "gemma-2-2b")
    if shape not in CONFIGS:
        raise SystemExit(f"hf_family_bench: unknown SHAPE '{shape}': {', '.join(CONFIGS)}")
    seq, bs, steps, warmup = env("SEQ", 2048), env("BS", 4), env("STEPS", 6), env("WARMUP", 2)
    rank = env("RANK", 16)
    device = os.environ.get("DEVICE", "cuda")
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[os.environ.get("DTYPE", "bf16")]
    public_layers = CONFIGS[shape]["num_hidden_layers"]
    layers = env("LAYERS", public_layers)
    moe_targets = os.environ.get("MOE_TARGETS", "experts")
    if moe_targets not in ("experts", "attention"):
        raise SystemExit(f"hf_family_bench: MOE_TARGETS must be experts or attention, not '{moe_targets}'")
    if steps <= warmup:
        raise SystemExit("hf_family_bench: STEPS must exceed WARMUP")
    cuda = device.startswith("cuda")
    sync = torch.cuda.synchronize if cuda else (lambda: None)

    from peft import get_peft_model

    torch.manual_seed(0)
    t0 = time.perf_counter()
    model = build(shape, layers, device, dtype, os.environ.get("ATTN"))
    attn = model.config._attn_implementation
    experts_impl = getattr(model.config, "_experts_implementation", None) if shape in MOE else None
    note = None
    fused = any(n.endswith("mlp.experts.gate_up_proj") for n, _ in model.named_parameters())
    try:
        model = get_peft_model(model, lora_config(shape, rank, moe_targets, fused))
    except Exception as e:
        if shape not in MOE or moe_targets != "experts":
            raise
        # An older PEFT may not wrap the router's 2-D weight: the experts without it, said so.
        note = f"router not adapted (PEFT: {type(e).__name__}: {str(e)[:120]})"
        print(f"hf_family_bench: {note}; again without the router", file=sys.stderr)
        del model
        model = build(shape, layers, device, dtype, os.environ.get("ATTN"))
        model = get_peft_model(model, lora_config(shape, rank, moe_targets, fused, router=False))
    targets = adapted(model) + ([note] if note else [])
    sync()
    init_s = time.perf_counter() - t0
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=2e-4, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, fused=cuda or None)
    x = torch.randint(0, CONFIGS[shape]["vocab_size"], (bs, seq), device=device)

    def step():
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    def timed(n):
        sync()
        t = time.perf_counter()
        out = [step() for _ in range(n)]
        sync()
        return time.perf_counter() - t, out

    if cuda:
        torch.cuda.reset_peak_memory_stats()
    # Losses stay on the device until the timing is over, so no step waits on the host.
    losses = [step() for _ in range(warmup)]
    dt, more = timed(steps - warmup)
    losses += more
    peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else None
    reserved = torch.cuda.max_memory_reserved() / 2**30 if cuda else None
    share = None
    if shape in MOE and os.environ.get("EXPERT_SHARE", "1") == "1":
        # As many steps again with the expert MLPs skipped (one untimed first): the share of
        # step time they take, forward and backward, is 1 − t_without / t_with.
        patched = 0
        for m in model.modules():
            if type(m).__name__.endswith("Experts"):
                m.forward = types.MethodType(identity_experts, m)
                patched += 1
        if patched:
            step()
            dt_without, _ = timed(steps - warmup)
            share = 1.0 - dt_without / dt
        else:
            print("hf_family_bench: no fused experts module to switch off: no expert_gemm_share", file=sys.stderr)
    import peft, transformers

    print(json.dumps({
        "system": "hf+peft", "shape": shape, "layers": layers, "public_layers": public_layers,
        "method": "lora", "seq": seq, "batch": bs, "grad_checkpointing": False,
        "tokens_per_s": round(bs * seq * (steps - warmup) / dt, 1),
        "peak_gib": None if peak is None else round(peak, 2),
        "reserved_gib": None if reserved is None else round(reserved, 2),
        "first_loss": round(losses[0].item(), 4), "last_loss": round(losses[-1].item(), 4),
        "trainable_params": sum(p.numel() for p in params),
        "adapter_dtype": str(params[0].dtype).removeprefix("torch."),
        "targets": targets, "attn_implementation": attn, "experts_implementation": experts_impl,
        "expert_gemm_share": None if share is None else round(share, 4),
        "init_s": round(init_s, 1), "device": torch.cuda.get_device_name() if cuda else device,
        "transformers": transformers.__version__, "peft": peft.__version__, "torch": torch.__version__,
    }))


if __name__ == "__main__":
    main()
