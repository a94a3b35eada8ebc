"""The "moe" model: GPT-2 blocks whose MLP is the sparse Mixture-of-Experts layer of minillm.nn.moe.

Everything but the config is GPT's (models/gpt.py plugs the layer in when config["n_experts"] > 0);
this module adds the MoE keys to the config and checks them. Kept next to "mixtral" (models/mixtral.py:
the same layer in Llama blocks, HF MixtralForCausalLM's names) as the smallest MoE model to read: GPT-2
blocks, per-layer Switch aux loss; its checkpoints load as before.
"""

from minillm.models import gpt
from minillm.nn import moe as moe_layer

HF_CLASS = None                 # no HF class: GPT-2 blocks with a Mixtral feed-forward
DEFAULTS = dict(moe_layer.DEFAULTS)
OPTIONS = gpt.OPTIONS + ("n_experts", "top_k", "aux_loss_coef")
LORA_TARGETS, NO_DECAY, BOUNDED_POSITIONS = gpt.LORA_TARGETS, gpt.NO_DECAY, gpt.BOUNDED_POSITIONS


def _config(config):
    cfg = dict(config)
    for key, value in DEFAULTS.items():
        cfg.setdefault(key, value)
    if int(cfg["n_experts"]) < 1:
        raise ValueError(f"--experts must be positive for the moe architecture, got {cfg['n_experts']}")
    if not 1 <= int(cfg["top_k"]) <= int(cfg["n_experts"]):
        raise ValueError(f"--experts-per-token (top-k) must lie in 1..{cfg['n_experts']}, got {cfg['top_k']}")
    return cfg


def init(config, rng):
    return gpt.init(_config(config), rng)


def forward(params, idx, config):
    return gpt.forward(params, idx, _config(config))


def init_state(params, config, batch):
    return gpt.init_state(params, _config(config), batch)


backward, step, aux_loss, stats = gpt.backward, gpt.step, gpt.aux_loss, gpt.stats
