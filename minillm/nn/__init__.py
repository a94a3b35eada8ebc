"""Layers with hand-written backprop: primitive ops, attention, the dense hook (LoRA / ternary / packed),
the Mixture-of-Experts layer. Each is a `*_forward` / `*_backward` pair; nothing here names an architecture."""
