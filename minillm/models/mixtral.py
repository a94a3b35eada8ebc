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
