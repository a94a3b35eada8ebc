"""Mixtral (Jiang et al. 2024), keyed like HF MixtralForCausalLM's released checkpoints: Llama's decoder
(models/llama.py: RMSNorm, RoPE, grouped-query attention, optional sliding window) whose feed-forward is
the sparse Mixture-of-Experts layer of nn/moe.py, under

    model.layers.{i}.block_sparse_moe.gate.weight (E, C)
    model.layers.{i}.block_sparse_moe.experts.{e}.w1.weight (F, C), .w3.weight (F, C), .w2.weight (C, F)

(transformers 5 renames these to mlp.gate / mlp.experts and fuses the experts on load:
gate_up_proj[e] = [w1; w3], down_proj[e] = w2; tests/peers.py's hf_mixtral converts).

The training loss adds aux_loss_coef * HF's load_balancing_loss_func: E sum_i F_i P_i with the token
fractions F and mean router probabilities P pooled over all layers (nn/moe.pooled_balance_loss), top_k
at perfect balance. Defaults follow the released Mixtral-8x7B config where it makes sense at this size:
8 experts, top 2, rope_theta 1e6, router_aux_loss_coef 0.02 (HF's MixtralConfig default is 0.001), no
sliding window; no router z-loss (Mixtral has none).
"""

from minillm.models import llama
from minillm.nn import moe as moe_layer

HF_CLASS = "MixtralForCausalLM"
DEFAULTS = {**llama.DEFAULTS, "rope_theta": 1e6, "n_experts": moe_layer.DEFAULTS["n_experts"],
            "top_k": moe_layer.DEFAULTS["top_k"], "aux_loss_coef": 0.02}
OPTIONS = llama.OPTIONS + ("n_experts", "top_k", "aux_loss_coef")
LORA_TARGETS, NO_DECAY, BOUNDED_POSITIONS = llama.LORA_TARGETS, llama.NO_DECAY, llama.BOUNDED_POSITIONS
HF_MODEL_TYPES = ("mixtral",)


def to_hf_config(config):
    """minillm config -> MixtralConfig keys (llama.to_hf_config with the experts)."""
    return llama.to_hf_config(_config(config))


def from_hf_config(hf):
    """MixtralConfig keys (an HFReader) -> minillm config; router jitter (training noise) is not implemented."""
    hf.only("router_jitter_noise", 0.0, 0.0)
    config = llama.from_hf_config(hf, "mixtral", theta=1e6, eps=1e-5)
    return {**config, "n_experts": hf.get("num_local_experts", 8), "top_k": hf.get("num_experts_per_tok", 2),
            "aux_loss_coef": float(hf.get("router_aux_loss_coef", 0.001))}


def from_hf_weights(flat, config):
    """HF Mixtral tensors -> ours (the released names). transformers 5 may store the layer as
    mlp.gate + fused mlp.experts.gate_up_proj (E, 2F, C) = [w1; w3] and down_proj (E, C, F) = w2: split."""
    out = {}
    for name, a in llama.from_hf_weights(flat, config).items():
        layer, fused, part = name.partition(".mlp.experts.")
        if part in ("gate_up_proj", "down_proj"):
            for e in range(a.shape[0]):
                pre = f"{layer}.block_sparse_moe.experts.{e}."
                if part == "down_proj":
                    out[pre + "w2.weight"] = a[e]
                else:
                    F = a.shape[1] // 2
                    out[pre + "w1.weight"], out[pre + "w3.weight"] = a[e, :F], a[e, F:]
        else:
            out[name.replace(".mlp.gate.", ".block_sparse_moe.gate.")] = a
    return out


def _config(config):
    cfg = dict(config)
    for key, value in DEFAULTS.items():
        cfg.setdefault(key, value)
    if int(cfg["n_experts"]) < 1:
        raise ValueError(f"--experts must be positive for the mixtral architecture, got {cfg['n_experts']}")
    if not 1 <= int(cfg["top_k"]) <= int(cfg["n_experts"]):
        raise ValueError(f"--experts-per-token (top-k) must lie in 1..{cfg['n_experts']}, got {cfg['top_k']}")
    cfg["router_z_loss_coef"] = 0.0
    return cfg


def init(config, rng):
    return llama.init(_config(config), rng)


def forward(params, idx, config):
    return llama.forward(params, idx, _config(config))


def init_state(params, config, batch):
    return llama.init_state(params, _config(config), batch)


backward, step, aux_loss, stats = llama.backward, llama.step, llama.aux_loss, llama.stats
