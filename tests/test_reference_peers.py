"""The peers named in the golden-case manifest (torch, HF transformers, peft, tiktoken) pass
`minillm.reference.check` through small adapters written in the calling convention

    fn(inputs, params, upstream, config) -> (outputs, grads),

float64 files at rtol 1e-9 and float32 files (genuine HF float32 code) at 1e-5. These adapters are
also worked examples of checking a PyTorch implementation against the golden files; the HF modules
are built from the golden params by the converters of tests/peers.py.
"""

import contextlib

import numpy as np
import pytest
import torch

import peers
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


def dtype_of(params):
    return torch.from_numpy(params[next(iter(params))]).dtype


def module_adapter(convert, inputs_key="x", output_key="y", extra=lambda m: {}):
    """An adapter for a module whose state dict is keyed like the golden params;
    convert(params, config, dtype) builds it with them loaded (a converter of peers.py)."""
    def fn(inputs, params, upstream, config):
        module = convert(params, config, dtype_of(params))
        x = T(inputs[inputs_key], True)
        y = module(x, **extra(x))
        y = y[0] if isinstance(y, tuple) else y
        backward({output_key: y}, upstream)
        named = dict(module.named_parameters())
        return {output_key: y}, {inputs_key: x.grad, **{k: named[k].grad for k in params}}
    return fn


def hf_layernorm(inputs, params, upstream, config):
    C = params["weight"].shape[0]
    return module_adapter(lambda p, c, dtype: peers.load_params(torch.nn.LayerNorm(C, eps=c["eps"]).to(dtype), p))(
        inputs, params, upstream, config)


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
    return module_adapter(peers.hf_gpt2_attention, extra=peers.gpt2_causal_mask)(inputs, params, upstream, config)


def hf_gpt_block(inputs, params, upstream, config):
    return module_adapter(peers.hf_gpt2_block, extra=peers.gpt2_causal_mask)(inputs, params, upstream, config)


def hf_gpt(inputs, params, upstream, config):
    model = peers.hf_gpt2(params, config, dtype_of(params))   # checks: only the tied lm_head is missing
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
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    E, k = config["n_experts"], config["top_k"]
    x = T(inputs["x"], True)
    block = peers.hf_mixtral_moe(params, config, x.dtype)   # HF 5 fuses the experts: [w1; w3], w2
    seen = {}
    block.gate.register_forward_hook(lambda m, i, o: seen.update(logits=o[0]))
    y = block(x)
    aux = load_balancing_loss_func((seen["logits"],), E, k).to(x.dtype)
    out = {"y": y, "aux_loss": aux, "router_logits": seen["logits"].reshape(x.shape[:-1] + (E,))}
    backward(out, upstream)
    return out, {"x": x.grad, **peers.mixtral_moe_grads(block)}


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
    with peers.mamba_float64():   # no .float(); HF's RMSNorm in the input dtype (it computes in float32)
        return module_adapter(peers.hf_mamba_block)(inputs, params, upstream, config)


def hf_wkv(inputs, params, upstream, config):
    from transformers.models.rwkv.modeling_rwkv import rwkv_linear_attention_cpu

    t = {k: T(v, True) for k, v in inputs.items()}
    y, _ = rwkv_linear_attention_cpu(t["time_decay"], t["time_first"], t["key"], t["value"])
    backward({"y": y}, upstream)
    return {"y": y}, torch_grads(t)


def hf_rwkv_block(inputs, params, upstream, config):
    return module_adapter(peers.hf_rwkv_block)(inputs, params, upstream, config)   # asserts the torch CPU path


def peft_lora(inputs, params, upstream, config):
    x = T(inputs["x"], True)
    model, _ = peers.peft_lora_linear(params, config["rank"], config["alpha"], x.dtype)
    lin = model.base_model.model.lin
    y = model(x)
    backward({"y": y}, upstream)
    assert lin.base_layer.weight.grad is None                 # frozen, as in the golden case
    return {"y": y}, {"x": x.grad, "lora_A": lin.lora_A["default"].weight.grad,
                      "lora_B": lin.lora_B["default"].weight.grad}


def hf_bitlinear(inputs, params, upstream, config):
    x = T(inputs["x"], True)
    layer = peers.hf_autobitlinear(params["weight"], params["bias"], online_quant=True, dtype=x.dtype)
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


def hf_rmsnorm(inputs, params, upstream, config):
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    C = params["weight"].shape[0]
    return module_adapter(lambda p, c, dtype: peers.load_params(LlamaRMSNorm(C, eps=c["eps"]).to(dtype), p))(
        inputs, params, upstream, config)


def _hf_llama_model(config, dtype, **sizes):
    """A one-layer HF model of the component's sizes: its rotary embedding and its first layer."""
    from transformers import AutoModelForCausalLM

    cfg = {"vocab_size": 8, "n_layer": 1, "context": 16, **config, **sizes}
    return AutoModelForCausalLM.from_config(peers.llama_config(cfg)).to(dtype)


def hf_rope(inputs, params, upstream, config):
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    x = T(inputs["x"], True)
    H, hd = x.shape[1], x.shape[-1]
    model = _hf_llama_model(config, x.dtype, d_model=H * hd, n_head=H)
    cos, sin = model.model.rotary_emb(x, T(inputs["position_ids"])[None])
    y, _ = apply_rotary_pos_emb(x, x, cos, sin)
    backward({"y": y}, upstream)
    return {"y": y}, {"x": x.grad}


def hf_swiglu(inputs, params, upstream, config):
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaMLP

    F, C = params["gate_proj.weight"].shape
    hc = LlamaConfig(hidden_size=C, intermediate_size=F, num_attention_heads=1)
    return module_adapter(lambda p, c, dtype: peers.load_params(LlamaMLP(hc).to(dtype), p))(
        inputs, params, upstream, config)


def _llama_layer_adapter(get_layer):
    """Adapter for one HF Llama-family layer taking (x, position_embeddings, attention_mask)."""
    def fn(inputs, params, upstream, config):
        x = T(inputs["x"], True)
        model = _hf_llama_model(config, x.dtype, d_model=x.shape[-1])
        layer = peers.load_params(get_layer(model), params)
        Tn, w = x.shape[1], config.get("sliding_window")
        i, j = np.indices((Tn, Tn))
        keep = (j <= i) & ((j > i - w) if w else True)
        mask = torch.zeros(Tn, Tn, dtype=x.dtype).masked_fill(T(~keep), torch.finfo(x.dtype).min)
        y = layer(x, position_embeddings=model.model.rotary_emb(x, torch.arange(Tn)[None]),
                  attention_mask=mask[None, None])
        y = y[0] if isinstance(y, tuple) else y
        backward({"y": y}, upstream)
        named = dict(layer.named_parameters())
        return {"y": y}, {"x": x.grad, **{k: named[k].grad for k in params}}
    return fn


hf_gqa_attention = _llama_layer_adapter(lambda m: m.model.layers[0].self_attn)
hf_llama_block = _llama_layer_adapter(lambda m: m.model.layers[0])


def hf_llama(inputs, params, upstream, config):
    model = peers.hf_llama(params, config, dtype_of(params))
    logits = model(input_ids=T(inputs["idx"])).logits
    backward({"logits": logits}, upstream)
    return {"logits": logits}, peers.llama_grads(model, config)


def hf_mixtral(inputs, params, upstream, config):
    model = peers.hf_llama(params, config, dtype_of(params))
    out = model(input_ids=T(inputs["idx"]))              # output_router_logits: aux_loss over all layers
    outputs = {"logits": out.logits, "aux_loss": out.aux_loss.to(out.logits.dtype)}
    backward(outputs, upstream)
    return outputs, peers.llama_grads(model, config)


PEERS = [  # (component, adapter, context manager, variants); float32 variants run the genuine HF code
    ("layernorm", hf_layernorm, contextlib.nullcontext, None),
    ("gelu", hf_gelu, contextlib.nullcontext, None),
    ("cross_entropy", torch_cross_entropy, contextlib.nullcontext, None),
    ("attention", hf_attention, contextlib.nullcontext, None),
    ("gpt_block", hf_gpt_block, contextlib.nullcontext, None),
    ("gpt", hf_gpt, contextlib.nullcontext, None),
    ("adamw", torch_adamw, contextlib.nullcontext, None),
    ("moe", hf_moe, peers.no_float_upcast, ["float64"]),
    ("moe", hf_moe, contextlib.nullcontext, ["float32"]),
    ("selective_scan", torch_selective_scan, contextlib.nullcontext, None),
    ("mamba_block", hf_mamba_block, contextlib.nullcontext, None),
    ("wkv", hf_wkv, peers.no_float_upcast, ["float64"]),
    ("wkv", hf_wkv, contextlib.nullcontext, ["float32"]),
    ("rwkv_block", hf_rwkv_block, peers.no_float_upcast, None),
    ("lora_linear", peft_lora, contextlib.nullcontext, None),
    ("bitlinear", hf_bitlinear, peers.no_float_upcast, ["float64"]),
    ("bitlinear", hf_bitlinear, contextlib.nullcontext, ["float32"]),
    ("ternary_pack", hf_ternary_pack, contextlib.nullcontext, None),
    ("tokenizer_encode", tiktoken_encode, contextlib.nullcontext, None),
]
for _name, _adapter in (("rmsnorm", hf_rmsnorm), ("rope", hf_rope), ("swiglu", hf_swiglu),
                        ("gqa_attention", hf_gqa_attention), ("llama_block", hf_llama_block),
                        ("llama", hf_llama), ("mixtral", hf_mixtral)):
    # HF's float32 casts (RMSNorm, rotary tables, eager softmax, router) disabled for float64 only
    PEERS.append((_name, _adapter, peers.llama_float64, ["float64"]))
    if _name not in ("swiglu", "llama_block"):      # the components with a float32 file: the genuine code
        PEERS.append((_name, _adapter, contextlib.nullcontext, ["float32"]))


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
