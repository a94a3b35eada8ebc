"""The peers named in the golden-case manifest (torch, HF transformers, peft, tiktoken) pass
`minillm.reference.check` through small adapters written in the calling convention

    fn(inputs, params, upstream, config) -> (outputs, grads),

float64 files at rtol 1e-9 and float32 files (genuine HF float32 code) at 1e-5. These adapters are
also worked examples of checking a PyTorch implementation against the golden files.
"""

import contextlib

import numpy as np
import pytest
import torch

from minillm import reference

torch._dynamo.config.disable = True   # HF wraps the BitNet quantisers in torch.compile: run them eagerly


@pytest.fixture(scope="module")
def golden(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("golden"))
    reference.make(path)
    return path


def T(a, grad=False):
    return torch.tensor(a, requires_grad=grad)


def backward(outputs, upstream):
    """sum_o <outputs[o], upstream[o]>, backpropagated."""
    total = sum((outputs[k] * T(upstream[k])).sum() for k in upstream)
    total.backward()


def torch_grads(tensors):
    return {k: (v.grad if v.grad is not None else torch.zeros_like(v)) for k, v in tensors.items()}


def module_adapter(make_module, inputs_key="x", output_key="y", extra=lambda m: {}):
    """An adapter for a module whose state dict is keyed like the golden params."""
    def fn(inputs, params, upstream, config):
        dtype = torch.from_numpy(params[next(iter(params))]).dtype
        module = make_module(config).to(dtype)
        module.load_state_dict({k: T(v) for k, v in params.items()}, strict=True)
        x = T(inputs[inputs_key], True)
        y = module(x, **extra(x))
        y = y[0] if isinstance(y, tuple) else y
        backward({output_key: y}, upstream)
        named = dict(module.named_parameters())
        return {output_key: y}, {inputs_key: x.grad, **{k: named[k].grad for k in params}}
    return fn


@contextlib.contextmanager
def no_float_upcast():
    """HF casts to float32 (`.float()`) in its MoE router, Mamba and RWKV CPU paths and BitNet
    quantisers: meant for half precision, a down-cast for float64. Make it a no-op for float64 so the
    comparison is float64-accurate (the genuine float32 behaviour is checked on the float32 files)."""
    original = torch.Tensor.float
    torch.Tensor.float = lambda self, *a, **k: self if self.dtype == torch.float64 else original(self, *a, **k)
    try:
        yield
    finally:
        torch.Tensor.float = original


def gpt2_config(config):
    from transformers import GPT2Config

    hc = GPT2Config(vocab_size=config.get("vocab_size", 8), n_positions=config.get("context", 64),
                    n_embd=config.get("d_model", 16), n_layer=config.get("n_layer", 1),
                    n_head=config["n_head"], activation_function="gelu_new", resid_pdrop=0.0,
                    embd_pdrop=0.0, attn_pdrop=0.0, layer_norm_epsilon=1e-5, tie_word_embeddings=True,
                    bos_token_id=0, eos_token_id=0)
    hc._attn_implementation = "eager"
    return hc


def causal_mask(x):
    """HF builds this in the model (create_causal_mask); a lone eager attention layer needs it given."""
    T_ = x.shape[1]
    upper = torch.triu(torch.ones(T_, T_, dtype=torch.bool), 1)
    return {"attention_mask": torch.zeros(T_, T_, dtype=x.dtype).masked_fill(upper, torch.finfo(x.dtype).min)}


def hf_layernorm(inputs, params, upstream, config):
    C = params["weight"].shape[0]
    return module_adapter(lambda c: torch.nn.LayerNorm(C, eps=c["eps"]))(inputs, params, upstream, config)


def hf_gelu(inputs, params, upstream, config):
    from transformers.activations import NewGELUActivation

    x = T(inputs["x"], True)
    y = NewGELUActivation()(x)
    backward({"y": y}, upstream)
    return {"y": y}, {"x": x.grad}


def torch_cross_entropy(inputs, params, upstream, config):
    logits = T(inputs["logits"], True)
    loss = torch.nn.functional.cross_entropy(logits, T(inputs["targets"]), ignore_index=config["ignore_index"])
    backward({"loss": loss}, upstream)
    return {"loss": loss}, {"logits": logits.grad}


def hf_attention(inputs, params, upstream, config):
    from transformers.models.gpt2.modeling_gpt2 import GPT2Attention

    return module_adapter(lambda c: GPT2Attention(gpt2_config(c), layer_idx=0), extra=causal_mask)(
        inputs, params, upstream, config)


def hf_gpt_block(inputs, params, upstream, config):
    from transformers.models.gpt2.modeling_gpt2 import GPT2Block

    return module_adapter(lambda c: GPT2Block(gpt2_config(c), layer_idx=0), extra=causal_mask)(
        inputs, params, upstream, config)


def hf_gpt(inputs, params, upstream, config):
    from transformers import GPT2LMHeadModel

    model = GPT2LMHeadModel(gpt2_config(config)).to(torch.from_numpy(params["transformer.wte.weight"]).dtype)
    missing, unexpected = model.load_state_dict({k: T(v) for k, v in params.items()}, strict=False)
    assert missing == ["lm_head.weight"] and not unexpected           # the tied head
    logits = model(input_ids=T(inputs["idx"])).logits
    backward({"logits": logits}, upstream)
    named = dict(model.named_parameters())
    return {"logits": logits}, {k: named[k].grad for k in params}


def torch_adamw(inputs, params, upstream, config):
    names = [k[len("param."):] for k in inputs if k.startswith("param.")]
    ps = {n: T(inputs["param." + n], True) for n in names}
    groups = [{"params": [ps[n]], "weight_decay": config["weight_decay"] if config["decay"][n] else 0.0}
              for n in names]
    opt = torch.optim.AdamW(groups, lr=config["lr"], betas=tuple(config["betas"]), eps=config["eps"],
                            foreach=False)
    for n in names:
        ps[n].grad = T(inputs["grad." + n])
        opt.state[ps[n]] = {"step": torch.tensor(float(config["step"])), "exp_avg": T(inputs["exp_avg." + n]),
                            "exp_avg_sq": T(inputs["exp_avg_sq." + n])}
    opt.step()
    out = {}
    for n in names:
        out["param." + n] = ps[n]
        out["exp_avg." + n], out["exp_avg_sq." + n] = opt.state[ps[n]]["exp_avg"], opt.state[ps[n]]["exp_avg_sq"]
    return out, {}


def hf_moe(inputs, params, upstream, config):
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock, load_balancing_loss_func

    E, k, F_ = config["n_experts"], config["top_k"], config["d_ff"]
    hc = MixtralConfig(hidden_size=config["d_model"], intermediate_size=F_, num_local_experts=E,
                       num_experts_per_tok=k, router_jitter_noise=0.0)
    hc._experts_implementation = "eager"
    x = T(inputs["x"], True)
    block = MixtralSparseMoeBlock(hc).to(x.dtype)
    with torch.no_grad():   # HF 5 fuses the experts: gate_up_proj[e] = [w1; w3], down_proj[e] = w2
        block.gate.weight.copy_(T(params["gate.weight"]))
        for e in range(E):
            w = lambda n: T(params[f"experts.{e}.{n}.weight"])   # noqa: E731
            block.experts.gate_up_proj[e].copy_(torch.cat([w("w1"), w("w3")]))
            block.experts.down_proj[e].copy_(w("w2"))
    seen = {}
    block.gate.register_forward_hook(lambda m, i, o: seen.update(logits=o[0]))
    y = block(x)
    aux = load_balancing_loss_func((seen["logits"],), E, k).to(x.dtype)
    out = {"y": y, "aux_loss": aux, "router_logits": seen["logits"].reshape(x.shape[:-1] + (E,))}
    backward(out, upstream)
    gu, gd = block.experts.gate_up_proj.grad, block.experts.down_proj.grad
    grads = {"x": x.grad, "gate.weight": block.gate.weight.grad}
    for e in range(E):
        grads.update({f"experts.{e}.w1.weight": gu[e, :F_], f"experts.{e}.w3.weight": gu[e, F_:],
                      f"experts.{e}.w2.weight": gd[e]})
    return out, grads


def torch_selective_scan(inputs, params, upstream, config):
    """The scan loop of HF MambaMixer.slow_forward (channels-first, as there), with torch autograd."""
    t = {k: T(v, True) for k, v in inputs.items()}
    x, dt = t["x"].transpose(1, 2), t["dt"].transpose(1, 2)             # (B, D, L)
    A, B, C = t["A"], t["B"], t["C"]                                     # (D, N), (B, L, N)
    dA = torch.exp(A[None, :, None, :] * dt[:, :, :, None])              # (B, D, L, N)
    dBu = dt[:, :, :, None] * B[:, None, :, :] * x[:, :, :, None]
    h = torch.zeros(x.shape[0], x.shape[1], A.shape[1], dtype=x.dtype)
    ys = []
    for i in range(x.shape[2]):
        h = dA[:, :, i] * h + dBu[:, :, i]
        ys.append(torch.matmul(h, C[:, i, :, None])[..., 0])
    y = (torch.stack(ys, dim=-1) + x * t["D"][None, :, None]).transpose(1, 2)
    backward({"y": y}, upstream)
    return {"y": y}, torch_grads(t)


def hf_mamba_block(inputs, params, upstream, config):
    from transformers import MambaConfig
    from transformers.models.mamba import modeling_mamba

    hc = MambaConfig(hidden_size=config["d_model"], state_size=config["d_state"], expand=config["expand"],
                     conv_kernel=config["d_conv"], time_step_rank=config["dt_rank"],
                     layer_norm_epsilon=config["norm_eps"], use_bias=False, use_conv_bias=True,
                     residual_in_fp32=False, use_mambapy=False)

    def rmsnorm_same_dtype(self, h):   # HF's RMSNorm computes in float32 whatever the input dtype
        return self.weight * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.variance_epsilon))

    saved = modeling_mamba.MambaRMSNorm.forward
    modeling_mamba.MambaRMSNorm.forward = rmsnorm_same_dtype
    try:
        with no_float_upcast():
            return module_adapter(lambda c: modeling_mamba.MambaBlock(hc, layer_idx=0))(
                inputs, params, upstream, config)
    finally:
        modeling_mamba.MambaRMSNorm.forward = saved


def hf_wkv(inputs, params, upstream, config):
    from transformers.models.rwkv.modeling_rwkv import rwkv_linear_attention_cpu

    t = {k: T(v, True) for k, v in inputs.items()}
    y, _ = rwkv_linear_attention_cpu(t["time_decay"], t["time_first"], t["key"], t["value"])
    backward({"y": y}, upstream)
    return {"y": y}, torch_grads(t)


def hf_rwkv_block(inputs, params, upstream, config):
    from transformers import RwkvConfig
    from transformers.models.rwkv import modeling_rwkv

    hc = RwkvConfig(hidden_size=config["d_model"], attention_hidden_size=config["d_model"],
                    intermediate_size=config["intermediate_size"], num_hidden_layers=1,
                    layer_norm_epsilon=config["layer_norm_epsilon"], rescale_every=0)
    assert modeling_rwkv.rwkv_cuda_kernel is None   # the torch CPU path
    return module_adapter(lambda c: modeling_rwkv.RwkvBlock(hc, layer_id=0))(inputs, params, upstream, config)


def peft_lora(inputs, params, upstream, config):
    from peft import LoraConfig, get_peft_model

    x = T(inputs["x"], True)
    O, I = params["weight"].shape
    base = torch.nn.Sequential()
    base.add_module("lin", torch.nn.Linear(I, O).to(x.dtype))
    model = get_peft_model(base, LoraConfig(r=config["rank"], lora_alpha=config["alpha"], target_modules=["lin"],
                                            lora_dropout=0.0, bias="none", init_lora_weights=False))
    lin = model.base_model.model.lin
    with torch.no_grad():
        lin.base_layer.weight.copy_(T(params["weight"]))
        lin.base_layer.bias.copy_(T(params["bias"]))
        lin.lora_A["default"].weight.copy_(T(params["lora_A"]))
        lin.lora_B["default"].weight.copy_(T(params["lora_B"]))
    y = model(x)
    backward({"y": y}, upstream)
    assert lin.base_layer.weight.grad is None                 # frozen, as in the golden case
    return {"y": y}, {"x": x.grad, "lora_A": lin.lora_A["default"].weight.grad,
                      "lora_B": lin.lora_B["default"].weight.grad}


def hf_bitlinear(inputs, params, upstream, config):
    from transformers.integrations.bitnet import AutoBitLinear

    x = T(inputs["x"], True)
    O, I = params["weight"].shape
    layer = AutoBitLinear(I, O, bias=True, online_quant=True, dtype=x.dtype)
    with torch.no_grad():
        layer.weight.copy_(T(params["weight"]))
        layer.bias.copy_(T(params["bias"]))
    y = layer(x)
    backward({"y": y}, upstream)
    return {"y": y}, {"x": x.grad, "weight": layer.weight.grad, "bias": layer.bias.grad}


def hf_ternary_pack(inputs, params, upstream, config):
    from transformers.integrations.bitnet import WeightQuant, pack_weights

    w = T(inputs["weight"])
    codes = torch.sign(WeightQuant.apply(w)).to(torch.int8)  # HF returns W_q * s (computed in float32)
    return {"packed": pack_weights(codes), "scale": w.abs().mean().clamp(min=1e-5).reshape(1)}, {}


def tiktoken_encode(inputs, params, upstream, config):
    import tiktoken
    from minillm.kernels.bpe import GPT2_PATTERN

    tokens = [bytes([b]) for b in range(256)]
    for a, b in params["merges"].tolist():
        tokens.append(tokens[a] + tokens[b])
    enc = tiktoken.Encoding("golden", pat_str=GPT2_PATTERN, mergeable_ranks={t: i for i, t in enumerate(tokens)},
                            special_tokens={})
    return {"ids": np.array(enc.encode_ordinary(bytes(inputs["text"]).decode("utf-8")), np.int64)}, {}


PEERS = [  # (component, adapter, context manager, variants); float32 variants run the genuine HF code
    ("layernorm", hf_layernorm, contextlib.nullcontext, None),
    ("gelu", hf_gelu, contextlib.nullcontext, None),
    ("cross_entropy", torch_cross_entropy, contextlib.nullcontext, None),
    ("attention", hf_attention, contextlib.nullcontext, None),
    ("gpt_block", hf_gpt_block, contextlib.nullcontext, None),
    ("gpt", hf_gpt, contextlib.nullcontext, None),
    ("adamw", torch_adamw, contextlib.nullcontext, None),
    ("moe", hf_moe, no_float_upcast, ["float64"]),
    ("moe", hf_moe, contextlib.nullcontext, ["float32"]),
    ("selective_scan", torch_selective_scan, contextlib.nullcontext, None),
    ("mamba_block", hf_mamba_block, contextlib.nullcontext, None),
    ("wkv", hf_wkv, no_float_upcast, ["float64"]),
    ("wkv", hf_wkv, contextlib.nullcontext, ["float32"]),
    ("rwkv_block", hf_rwkv_block, no_float_upcast, None),
    ("lora_linear", peft_lora, contextlib.nullcontext, None),
    ("bitlinear", hf_bitlinear, no_float_upcast, ["float64"]),
    ("bitlinear", hf_bitlinear, contextlib.nullcontext, ["float32"]),
    ("ternary_pack", hf_ternary_pack, contextlib.nullcontext, None),
    ("tokenizer_encode", tiktoken_encode, contextlib.nullcontext, None),
]


@pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning", "ignore::DeprecationWarning")
@pytest.mark.parametrize("name, adapter, context, variants", PEERS,
                         ids=[f"{p[0]}-{p[3][0] if p[3] else 'all'}" for p in PEERS])
def test_peer_passes(golden, name, adapter, context, variants):
    with context():
        report = reference.check(name, adapter, golden, variants=variants)
    assert report.ok, report.format()
    assert all(r.ok and np.isfinite(r.rel) for r in report.rows if not r.note), report.format()


def test_every_component_has_a_peer_or_a_reason():
    # tokenizer_train: no peer trainer shares our tie-break (HF tokenizers and minbpe order ties
    # differently); its merges are checked against minillm's plain-Python specification instead.
    assert {p[0] for p in PEERS} | {"tokenizer_train"} == set(reference.components())
