"""The house rules on imports: no import cycle among minillm's modules (lazy, in-function imports
included), and one kernel dispatch (nothing outside minillm/kernels/ picks an implementation itself)."""

import ast
import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parents[1] / "minillm"


def module_name(path):
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph():
    """{module: set of minillm modules it imports}, a package's own submodules and parents left out."""
    paths = {module_name(p): p for p in ROOT.rglob("*.py")}
    graph = {}
    for name, path in paths.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        targets = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                targets.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(up + ([base] if base else []))
                targets.add(base)
                targets.update(f"{base}.{a.name}" for a in node.names)
        resolved = set()
        for t in targets:
            while t and t not in paths:
                t = t.rpartition(".")[0]
            if t and t != name and not t.startswith(name + ".") and not name.startswith(t + "."):
                resolved.add(t)
        graph[name] = resolved
    return graph


def find_cycle(graph):
    """One cycle as a list of modules, or None (depth-first search with colours)."""
    colour, stack = {}, []

    def visit(v):
        colour[v] = "grey"
        stack.append(v)
        for w in sorted(graph[v]):
            if colour.get(w) == "grey":
                return stack[stack.index(w):] + [w]
            if w not in colour:
                found = visit(w)
                if found:
                    return found
        stack.pop()
        colour[v] = "black"
        return None

    for v in sorted(graph):
        if v not in colour:
            found = visit(v)
            if found:
                return found
    return None


def test_no_import_cycles():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_cycle_finder_finds_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_one_kernel_dispatch():
    """Outside minillm/kernels/, no module tests for CuPy / Numba or imports a *_cuda module to choose an
    implementation: every choice goes through kernels.pick / kernels.select."""
    suspicious = re.compile(r"_on_gpu|_use_kernel|KERNEL_MIN_SIZE|_backend\(|__name__ == \"numpy\"|"
                            r"import \w+_cuda|kernels\.\w+_cuda|copy_to_host|__cuda_array_interface__")
    offenders = []
    for path in ROOT.rglob("*.py"):
        if path.parent.name == "kernels" or path.name == "arrays.py":
            continue
        for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if suspicious.search(line):
                offenders.append(f"{path.relative_to(ROOT.parent)}:{i}: {line.strip()}")
    assert not offenders, "\n".join(offenders)
