"""Nested parameter dicts <-> flat dicts with dotted names (the names used in checkpoints).

    {"h": {"0": {"attn": {"c_attn": {"weight": W}}}}}  <->  {"h.0.attn.c_attn.weight": W}

`flatten` also accepts lists/tuples (their indices become name parts) and skips `None` leaves (an
absent optional bias); `unflatten` always builds dicts with string keys. Leaves are returned as the
same array objects (no copies), so an in-place update through the flat dict updates the tree.
"""


def flatten(tree, prefix=""):
    """Nested dict (of dicts/lists/arrays) -> {dotted name: array}, in insertion order.

    Keys that already contain dots are kept as they are, so flattening a flat dict returns it
    unchanged; two paths that spell the same dotted name raise ValueError.
    """
    flat = {}
    _flatten_into(tree, prefix, flat)
    return flat


def _flatten_into(node, prefix, flat):
    if isinstance(node, dict):
        items = node.items()
    elif isinstance(node, (list, tuple)):
        items = enumerate(node)
    else:
        if not prefix:
            raise ValueError("flatten expects a dict of parameters, got a bare "
                             f"{type(node).__name__}")
        if prefix in flat:
            raise ValueError(f"parameter name {prefix!r} occurs twice in the tree")
        flat[prefix] = node
        return
    for key, value in items:
        if isinstance(key, bool) or not isinstance(key, (str, int)):
            raise ValueError(f"parameter keys must be strings, got {key!r} under {prefix!r}")
        key = str(key)
        if key == "" or key.startswith(".") or key.endswith("."):
            raise ValueError(f"bad parameter key {key!r} under {prefix!r}")
        if value is None:
            continue
        _flatten_into(value, f"{prefix}.{key}" if prefix else key, flat)


def unflatten(flat):
    """{dotted name: array} -> nested dict with string keys (inverse of `flatten` on dict trees)."""
    tree = {}
    for name, value in flat.items():
        parts = name.split(".")
        if any(p == "" for p in parts):
            raise ValueError(f"bad parameter name {name!r}")
        node = tree
        for i, part in enumerate(parts[:-1]):
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ValueError(f"parameter {'.'.join(parts[:i + 1])!r} is both a tensor and a "
                                 f"prefix of {name!r}")
            node = child
        if parts[-1] in node:
            raise ValueError(f"parameter {name!r} is both a tensor and a prefix of other names")
        node[parts[-1]] = value
    return tree
