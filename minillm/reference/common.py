"""What the golden-case modules share: the tolerances, the normal draw of the samplers and the shape of
a registry entry. cases_models.py (MoE, Mamba, RWKV, BitNet), cases_llama.py (the Llama family) and
cases.py (the rest, and the registry COMPONENTS of all of them) import this; it imports no other
reference module, so no case module needs another's helpers (cases.py imports cases_models.py and
cases_llama.py, never the other way round).
"""

import numpy as np

F32_RTOL = 1e-5   # float32 variants: expected values are float64 results; HF float32 classes are within 8e-7
F64_RTOL = 1e-9   # float64: same math in another order agrees to ~1e-14; a wrong convention is >= 1e-6


def normal(rng, shape, scale=1.0, shift=0.0):
    """float64 draw: rng.standard_normal(shape) * scale + shift."""
    return rng.standard_normal(shape) * scale + shift


def entry(fn, sample, config, matches, math, float32=False):
    """One registry entry: the component function, its sampler, the config given to implementations,
    the variants written with their tolerances (float64 always; float32 where implementations commonly
    run in float32 and rounding matters), which peer it matches, and the exact math."""
    variants = {"float64": F64_RTOL}   # integer tensors (ids, merges, packed bytes) must match exactly
    if float32:
        variants["float32"] = F32_RTOL
    return {"fn": fn, "sample": sample, "config": config, "matches": matches, "math": math,
            "variants": variants}
