"""The Hugging Face / peft peers, built from minillm parameters: one converter per architecture.

Each `hf_*` function builds the transformers (or peft) module that a minillm component is checked or
timed against and loads minillm's weights into it. minillm's checkpoint names are HF's (GPT-2, Mamba,
RWKV-4, the layers), so most converters are a config plus `load_params`; the MoE experts are the
exception (HF 5 stores them fused). Also here: the switches that neutralise HF's float32 up-casts,
so that float64 comparisons are float64-accurate (no_float_upcast, mamba_float64, llama_float64).

Used by the tests (tests/ is on sys.path through conftest.py) and by the benchmarks (through
benchmarks/harness.py). Converters take minillm params as a nested tree or a flat {dotted name: array}
dict, and a `dtype` for the torch module; they leave the module in training mode (dropout is 0
everywhere, so only callers that say `.eval()` need it).
"""

import contextlib

import numpy as np
import torch

from minillm.tree import flatten, unflatten


def _t(a):
    """A NumPy array as a torch tensor (a copy: any strides, the array's dtype)."""
    return torch.tensor(np.asarray(a))


def load_params(module, params, missing=()):
    """Copy minillm params into `module` by name (our names = its state-dict names) and return it.
    `missing`: the state-dict entries we do not hold (a tied head); anything else absent, extra or of
    another shape fails."""
    state = {k: _t(v) for k, v in flatten(params).items()}
    got_missing, unexpected = module.load_state_dict(state, strict=not missing)
    assert list(got_missing) == list(missing) and not unexpected, (got_missing, unexpected)
    return module


# --- float32 up-cast switches -------------------------------------------------------------------------


@contextlib.contextmanager
def no_float_upcast():
    """HF casts to float32 (`.float()`) in its MoE router and aux loss, the Mamba slow path, the RWKV CPU
    loop and the BitNet quantisers: meant for half precision, it is a down-cast for float64. Make it a
    no-op for float64 tensors so HF computes in float64 throughout."""
    original = torch.Tensor.float
    torch.Tensor.float = lambda self, *a, **k: self if self.dtype == torch.float64 else original(self, *a, **k)
    try:
        yield
    finally:
        torch.Tensor.float = original


def _rmsnorm_same_dtype(self, hidden_states):
    variance = hidden_states.pow(2).mean(-1, keepdim=True)
    return self.weight * (hidden_states * torch.rsqrt(variance + self.variance_epsilon))


@contextlib.contextmanager
def mamba_float64():
    """`no_float_upcast`, and MambaRMSNorm in the input dtype (HF's computes in float32 whatever the
    input): HF Mamba's slow path then runs in float64 throughout."""
    from transformers.models.mamba import modeling_mamba

    saved = modeling_mamba.MambaRMSNorm.forward
    modeling_mamba.MambaRMSNorm.forward = _rmsnorm_same_dtype
    try:
        with no_float_upcast():
            yield
    finally:
        modeling_mamba.MambaRMSNorm.forward = saved


# --- GPT-2 ----------------------------------------------------------------------------------------------


def gpt2_config(config, attn="eager"):
    """GPT2Config for a minillm GPT config (gelu_new, no dropout, eps 1e-5, tied head). Missing sizes
    take small defaults (the golden cases of lone layers give only n_head). attn: HF's attention
    implementation ("eager", "sdpa"), or None for HF's default choice."""
    from transformers import GPT2Config

    hc = GPT2Config(vocab_size=config.get("vocab_size", 8), n_positions=config.get("context", 64),
                    n_embd=config.get("d_model", 16), n_layer=config.get("n_layer", 1),
                    n_head=config["n_head"], activation_function="gelu_new", resid_pdrop=0.0,
                    embd_pdrop=0.0, attn_pdrop=0.0, layer_norm_epsilon=1e-5, tie_word_embeddings=True,
                    bos_token_id=0, eos_token_id=0)
    if attn is not None:
        hc._attn_implementation = attn
    return hc


def hf_gpt2(params, config, dtype=torch.float64, attn="eager"):
    """GPT2LMHeadModel with minillm's GPT weights (its lm_head is tied to transformer.wte)."""
    from transformers import GPT2LMHeadModel

    return load_params(GPT2LMHeadModel(gpt2_config(config, attn)).to(dtype), params, missing=["lm_head.weight"])


def hf_gpt2_block(params, config, dtype=torch.float64):
    """GPT2Block (layer 0, eager attention) with minillm's block weights (ln_1, attn, ln_2, mlp)."""
    from transformers.models.gpt2.modeling_gpt2 import GPT2Block

    return load_params(GPT2Block(gpt2_config(config), layer_idx=0).to(dtype), params)


def hf_gpt2_attention(params, config, dtype=torch.float64):
    """GPT2Attention (layer 0, eager) with minillm's c_attn / c_proj weights."""
    from transformers.models.gpt2.modeling_gpt2 import GPT2Attention

    return load_params(GPT2Attention(gpt2_config(config), layer_idx=0).to(dtype), params)


def gpt2_causal_mask(x):
    """{"attention_mask": ...} for a lone eager GPT-2 layer on x (B, T, C): HF builds the causal mask in
    the model (create_causal_mask), a layer called on its own needs it given."""
    T = x.shape[1]
    upper = torch.triu(torch.ones(T, T, dtype=torch.bool), 1)
    return {"attention_mask": torch.zeros(T, T, dtype=x.dtype).masked_fill(upper, torch.finfo(x.dtype).min)}


# --- MoE: Mixtral's sparse block --------------------------------------------------------------------------


def hf_mixtral_moe(params, config, dtype=torch.float64, experts_impl="eager"):
    """MixtralSparseMoeBlock with minillm's MoE feed-forward (gate.weight, experts.<e>.w1/w2/w3.weight,
    nn.Linear (out, in)); n_experts and top_k from config, the sizes from the weights; no router
    jitter. HF 5 fuses the experts: gate_up_proj[e] = [w1; w3], down_proj[e] = w2. experts_impl: HF's
    experts implementation ("eager", "batched_mm", ...)."""
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    p = unflatten(flatten(params))
    E = config["n_experts"]
    C, F = p["gate"]["weight"].shape[1], p["experts"]["0"]["w1"]["weight"].shape[0]
    hc = MixtralConfig(hidden_size=C, intermediate_size=F, num_local_experts=E,
                       num_experts_per_tok=config["top_k"], router_jitter_noise=0.0)
    hc._experts_implementation = experts_impl
    block = MixtralSparseMoeBlock(hc).to(dtype)
    with torch.no_grad():
        block.gate.weight.copy_(_t(p["gate"]["weight"]))
        for e in range(E):
            pe = p["experts"][str(e)]
            block.experts.gate_up_proj[e].copy_(_t(np.concatenate([pe["w1"]["weight"], pe["w3"]["weight"]])))
            block.experts.down_proj[e].copy_(_t(pe["w2"]["weight"]))
    return block


def mixtral_moe_grads(block):
    """The parameter gradients of a backpropagated `hf_mixtral_moe` block in minillm's flat names
    (torch tensors): the fused expert gradients split back into w1, w3 and w2."""
    F = block.experts.gate_up_proj.shape[1] // 2
    gu, gd = block.experts.gate_up_proj.grad, block.experts.down_proj.grad
    grads = {"gate.weight": block.gate.weight.grad}
    for e in range(gu.shape[0]):
        grads.update({f"experts.{e}.w1.weight": gu[e, :F], f"experts.{e}.w2.weight": gd[e],
                      f"experts.{e}.w3.weight": gu[e, F:]})
    return grads


# --- Llama, Mistral (Llama + sliding window), Mixtral -------------------------------------------------------


def _softmax_keeps_float64(original):
    def softmax(x, *a, dtype=None, **k):
        if dtype == torch.float32 and x.dtype == torch.float64:
            dtype = None
        return original(x, *a, dtype=dtype, **k)
    return softmax


def _rotary_float64(original):
    def forward(self, x, position_ids):
        if x.dtype != torch.float64:
            return original(self, x, position_ids)
        theta, hd = self.config.rope_parameters["rope_theta"], self.inv_freq.shape[0] * 2
        inv_freq = 1.0 / theta ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd)
        freqs = position_ids[..., None].to(torch.float64) * inv_freq
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos(), emb.sin()
    return forward


@contextlib.contextmanager
def llama_float64():
    """HF's Llama, Mistral and Mixtral compute in float32 in four places even for float64 weights: the
    RMSNorm (`hidden_states.to(torch.float32)`), the rotary tables (inv_freq, angles, cos and sin), the
    eager attention softmax (`softmax(..., dtype=torch.float32)`) and Mixtral's router (`.float()`). Within
    the block all four stay in float64 (float32 inputs run the genuine code)."""
    from transformers.models.llama import modeling_llama
    from transformers.models.mistral import modeling_mistral
    from transformers.models.mixtral import modeling_mixtral

    saved = []
    for mod, prefix in ((modeling_llama, "Llama"), (modeling_mistral, "Mistral"), (modeling_mixtral, "Mixtral")):
        norm, rot = getattr(mod, prefix + "RMSNorm"), getattr(mod, prefix + "RotaryEmbedding")
        saved += [(norm, "forward", norm.forward), (rot, "forward", rot.forward)]
        norm.forward = _rmsnorm_same_dtype
        rot.forward = _rotary_float64(rot.forward)
    saved.append((torch.nn.functional, "softmax", torch.nn.functional.softmax))
    torch.nn.functional.softmax = _softmax_keeps_float64(torch.nn.functional.softmax)
    try:
        with no_float_upcast():
            yield
    finally:
        for owner, name, value in reversed(saved):
            setattr(owner, name, value)


def llama_config(config, attn="eager"):
    """LlamaConfig for a minillm llama config; MistralConfig when it has a sliding window; MixtralConfig
    when it has experts (router_aux_loss_coef = aux_loss_coef, output_router_logits on)."""
    from transformers import LlamaConfig, MistralConfig, MixtralConfig

    from minillm.models import llama

    C, H = config["d_model"], config["n_head"]
    kw = dict(vocab_size=config["vocab_size"], hidden_size=C, intermediate_size=llama.d_ff_of(config),
              num_hidden_layers=config["n_layer"], num_attention_heads=H,
              num_key_value_heads=config.get("n_kv_head") or H, head_dim=config.get("head_dim") or C // H,
              max_position_embeddings=config.get("context", 64), rms_norm_eps=config.get("rms_norm_eps", 1e-5),
              rope_parameters={"rope_type": "default", "rope_theta": config.get("rope_theta", 10000.0)},
              tie_word_embeddings=bool(config.get("tie_embeddings")), attention_dropout=0.0,
              bos_token_id=0, eos_token_id=0, pad_token_id=None)
    if config.get("n_experts"):
        hc = MixtralConfig(num_local_experts=config["n_experts"], num_experts_per_tok=config["top_k"],
                           router_aux_loss_coef=config.get("aux_loss_coef", 0.0), output_router_logits=True,
                           router_jitter_noise=0.0, sliding_window=config.get("sliding_window"), **kw)
        hc._experts_implementation = "eager"    # grouped_mm has no float64 kernel
    elif config.get("sliding_window"):
        hc = MistralConfig(sliding_window=config["sliding_window"], **kw)
    else:
        hc = LlamaConfig(attention_bias=False, mlp_bias=False, **kw)
    if attn is not None:
        hc._attn_implementation = attn
    return hc


def mixtral_state(params):
    """minillm Mixtral params (released names block_sparse_moe.experts.<e>.w1/w2/w3) -> HF 5's state dict
    (mlp.gate, fused mlp.experts.gate_up_proj = [w1; w3], down_proj = w2), numpy arrays."""
    flat, out = flatten(params), {}
    for name, a in flat.items():
        if ".block_sparse_moe.experts." not in name:
            out[name.replace(".block_sparse_moe.", ".mlp.")] = a
    layers = sorted({n.split(".block_sparse_moe.")[0] for n in flat if ".block_sparse_moe." in n})
    for layer in layers:
        pre = f"{layer}.block_sparse_moe.experts."
        E = len({n[len(pre):].split(".")[0] for n in flat if n.startswith(pre)})
        w = lambda e, k: flat[f"{pre}{e}.{k}.weight"]  # noqa: E731
        out[f"{layer}.mlp.experts.gate_up_proj"] = np.stack([np.concatenate([w(e, "w1"), w(e, "w3")]) for e in range(E)])
        out[f"{layer}.mlp.experts.down_proj"] = np.stack([w(e, "w2") for e in range(E)])
    return out


def hf_llama(params, config, dtype=torch.float64, attn="eager"):
    """LlamaForCausalLM (MistralForCausalLM with a sliding window, MixtralForCausalLM with experts) with
    minillm's weights; its lm_head is tied to model.embed_tokens when config["tie_embeddings"]."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(llama_config(config, attn)).to(dtype)
    state = mixtral_state(params) if config.get("n_experts") else flatten(params)
    return load_params(model, state, missing=["lm_head.weight"] if config.get("tie_embeddings") else ())


def llama_grads(model, config):
    """The parameter gradients of a backpropagated `hf_llama` model in minillm's flat names (torch tensors;
    Mixtral's fused expert gradients split back into w1, w3, w2)."""
    grads = {}
    for name, p in model.named_parameters():
        if name.endswith("mlp.experts.gate_up_proj"):
            layer, F = name[: -len(".mlp.experts.gate_up_proj")], p.shape[1] // 2
            for e in range(p.shape[0]):
                grads[f"{layer}.block_sparse_moe.experts.{e}.w1.weight"] = p.grad[e, :F]
                grads[f"{layer}.block_sparse_moe.experts.{e}.w3.weight"] = p.grad[e, F:]
        elif name.endswith("mlp.experts.down_proj"):
            layer = name[: -len(".mlp.experts.down_proj")]
            for e in range(p.shape[0]):
                grads[f"{layer}.block_sparse_moe.experts.{e}.w2.weight"] = p.grad[e]
        elif config.get("n_experts"):
            grads[name.replace(".mlp.", ".block_sparse_moe.")] = p.grad
        else:
            grads[name] = p.grad
    return grads


# --- Mamba ----------------------------------------------------------------------------------------------


def mamba_config(cfg):
    """MambaConfig for a minillm Mamba config (d_model, d_state, d_conv, expand, dt_rank, norm_eps; and
    vocab_size / n_layer for a whole model): no in/out-projection bias, conv bias, no float32 residual,
    HF's slow torch path (no mambapy, no associative scan), tied head."""
    from transformers import MambaConfig

    extra = {k: cfg[m] for k, m in (("vocab_size", "vocab_size"), ("num_hidden_layers", "n_layer")) if m in cfg}
    return MambaConfig(hidden_size=cfg["d_model"], state_size=cfg["d_state"], expand=cfg["expand"],
                       conv_kernel=cfg["d_conv"], time_step_rank=cfg["dt_rank"],
                       layer_norm_epsilon=cfg["norm_eps"], use_bias=False, use_conv_bias=True,
                       residual_in_fp32=False, use_mambapy=False, use_associative_scan=False,
                       tie_word_embeddings=True, **extra)


def hf_mamba(params, cfg, dtype=torch.float64):
    """MambaForCausalLM with minillm's Mamba weights (its lm_head is tied to backbone.embeddings)."""
    from transformers import MambaForCausalLM

    return load_params(MambaForCausalLM(mamba_config(cfg)).to(dtype), params, missing=["lm_head.weight"])


def hf_mamba_block(params, cfg, dtype=torch.float64):
    """MambaBlock (layer 0: norm, mixer) with minillm's block weights."""
    from transformers.models.mamba.modeling_mamba import MambaBlock

    return load_params(MambaBlock(mamba_config(cfg), layer_idx=0).to(dtype), params)


def hf_mamba_mixer(params, cfg, dtype=torch.float64):
    """MambaMixer (layer 0) with minillm's mixer weights (mamba.init_mixer)."""
    from transformers.models.mamba.modeling_mamba import MambaMixer

    return load_params(MambaMixer(mamba_config(cfg), layer_idx=0).to(dtype), params)


# --- RWKV-4 ---------------------------------------------------------------------------------------------


def rwkv_config(cfg):
    """RwkvConfig for a minillm RWKV config (d_model, intermediate_size, layer_norm_epsilon; vocab_size,
    context, n_layer for a whole model, else one layer): attention width = d_model, no rescaling
    (rescale_every=0), untied head."""
    from transformers import RwkvConfig

    extra = {k: cfg[m] for k, m in (("vocab_size", "vocab_size"), ("context_length", "context")) if m in cfg}
    return RwkvConfig(hidden_size=cfg["d_model"], attention_hidden_size=cfg["d_model"],
                      intermediate_size=cfg["intermediate_size"], num_hidden_layers=cfg.get("n_layer", 1),
                      layer_norm_epsilon=cfg["layer_norm_epsilon"], rescale_every=0,
                      tie_word_embeddings=False, **extra)


def _assert_rwkv_cpu_path():
    from transformers.models.rwkv import modeling_rwkv

    assert modeling_rwkv.rwkv_cuda_kernel is None  # the pure-torch CPU path


def hf_rwkv(params, cfg, dtype=torch.float64):
    """RwkvForCausalLM with minillm's RWKV weights: exactly its state dict, names and shapes."""
    from transformers import RwkvForCausalLM

    model = RwkvForCausalLM(rwkv_config(cfg)).to(dtype)
    theirs, ours = model.state_dict(), flatten(params)
    assert sorted(ours) == sorted(theirs)
    for k in ours:
        assert ours[k].shape == tuple(theirs[k].shape), k
    load_params(model, ours)
    _assert_rwkv_cpu_path()
    return model


def hf_rwkv_block(params, cfg, dtype=torch.float64):
    """RwkvBlock(layer_id=0: with pre_ln) with minillm's block weights."""
    from transformers.models.rwkv.modeling_rwkv import RwkvBlock

    block = load_params(RwkvBlock(rwkv_config(cfg), layer_id=0).to(dtype), params)
    _assert_rwkv_cpu_path()
    return block


# --- LoRA (peft) ----------------------------------------------------------------------------------------


def peft_lora(base, adapters, rank, alpha, targets, fan_in_fan_out=False):
    """peft LoRA (no dropout, bias 'none') on the torch module `base`, its adapters set from minillm's
    ({"<layer>.lora_A": (r, in), "<layer>.lora_B": (out, r)}; other entries are ignored).
    fan_in_fan_out: True for GPT-2's Conv1D (peft turns it on by itself, with a warning).
    Returns (peft model, {our adapter name: the peft parameter})."""
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(base, LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(targets),
                                            lora_dropout=0.0, fan_in_fan_out=fan_in_fan_out,
                                            init_lora_weights=False, bias="none"))
    theirs = {n.replace("base_model.model.", "").replace(".default.weight", ""): p
              for n, p in model.named_parameters() if p.requires_grad}
    ours = flatten(adapters)
    with torch.no_grad():
        for n, p in theirs.items():
            p.copy_(_t(ours[n]))
    return model, theirs


def peft_lora_linear(params, rank, alpha, dtype=torch.float64):
    """peft LoRA on one torch.nn.Linear named "lin", from minillm's weight (out, in), bias, lora_A,
    lora_B. Returns (peft model, {"lin.lora_A": ..., "lin.lora_B": ...})."""
    O, I = params["weight"].shape
    base = torch.nn.Sequential()
    base.add_module("lin", load_params(torch.nn.Linear(I, O).to(dtype),
                                       {"weight": params["weight"], "bias": params["bias"]}))
    return peft_lora(base, {"lin.lora_A": params["lora_A"], "lin.lora_B": params["lora_B"]}, rank, alpha, ["lin"])


# --- BitNet b1.58 ---------------------------------------------------------------------------------------


def hf_autobitlinear(weight, bias=None, online_quant=True, weight_scale=None, dtype=torch.float64):
    """transformers' AutoBitLinear with an (out, in) weight. online_quant=True (QAT): `weight` is the latent
    weight, quantised on the fly; False (offline, the released checkpoints' mode): `weight` holds the
    ternary codes and `weight_scale` the scale s = mean |W| it multiplies by."""
    from transformers.integrations.bitnet import AutoBitLinear

    O, I = weight.shape
    layer = AutoBitLinear(I, O, bias=bias is not None, online_quant=online_quant, dtype=dtype)
    with torch.no_grad():
        layer.weight.copy_(_t(weight))
        if weight_scale is not None:
            layer.weight_scale.fill_(float(weight_scale))
        if bias is not None:
            layer.bias.copy_(_t(bias))
    return layer


def hf_bitlinear_packed(packed, scale, shape, bias=None, dtype=torch.float64):
    """transformers' packed BitLinear from minillm's ternary.pack_weight output (packed bytes, scale s,
    (out, in)); HF's weight_scale is 1 / s (it divides by it)."""
    from transformers.integrations.bitnet import BitLinear

    O, I = shape
    m = BitLinear(I, O, bias=bias is not None, dtype=dtype)
    with torch.no_grad():
        m.weight.copy_(_t(packed))
        m.weight_scale.fill_(1.0 / float(np.asarray(scale).reshape(-1)[0]))
        if bias is not None:
            m.bias.copy_(_t(bias))
    return m
