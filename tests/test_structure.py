"""The package's structure, read from its source (AST, nothing executed): no import cycles, no
PartitionSpec outside parallel/, and one forward pass."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("dsv3_jax", "pallas_kernels")


def _modules() -> dict[str, Path]:
    modules = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            parts = path.relative_to(ROOT).with_suffix("").parts
            modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


def import_graph(modules: dict[str, Path]) -> dict[str, set[str]]:
    """module -> the package modules it imports anywhere in its file (function-local imports too)."""
    def resolve(name: str) -> str | None:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    graph = {}
    for module, path in modules.items():
        is_package = path.name == "__init__.py"
        targets = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = module.split(".")[:len(module.split(".")) - node.level + is_package]
                    base = ".".join(anchor + ([base] if base else []))
                names = [base] + [f"{base}.{alias.name}" for alias in node.names]
            else:
                continue
            # `from pkg import sub` imports pkg.sub; `from pkg.mod import name` imports pkg.mod.
            targets.update(t for t in map(resolve, names) if t and t != module and not module.startswith(t + "."))
        graph[module] = targets
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a path [a, b, ..., a], or None (depth-first search, colours)."""
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        state[node] = "done"
        stack.pop()
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_cycle_finder_finds_a_planted_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycles_among_package_modules():
    modules = _modules()
    graph = import_graph(modules)
    assert "dsv3_jax.config" in graph["dsv3_jax.model.moe"]  # the scan sees real imports
    assert graph["dsv3_jax.config"] == set(), "config.py is plain data and imports nothing from the package"
    assert find_cycle(graph) is None, f"import cycle: {' -> '.join(find_cycle(graph))}"


def test_no_partition_spec_outside_parallel():
    offenders = []
    for path in _modules().values():
        if path.is_relative_to(ROOT / "dsv3_jax" / "parallel"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            named = {alias.name for alias in node.names} if isinstance(node, (ast.Import, ast.ImportFrom)) else set()
            if "PartitionSpec" in named or (isinstance(node, ast.Attribute) and node.attr == "PartitionSpec"):
                offenders.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert not offenders, f"PartitionSpec outside dsv3_jax/parallel/: {offenders}"


def test_pipelined_training_calls_the_models_forward_pieces():
    """train/pipelined.py builds on the model's pieces, never on the layers a forward is made of."""
    source = (ROOT / "dsv3_jax" / "train" / "pipelined.py").read_text()
    calls = {node.func.attr for node in ast.walk(ast.parse(source))
             if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)}
    assert {"embed_and_dense", "head_and_mtp"} <= calls
    imported = {alias.name for node in ast.walk(ast.parse(source)) if isinstance(node, ast.ImportFrom)
                for alias in node.names}
    copies = ({"embed", "final_norm", "head", "logits", "mtp", "dense_layers"} & calls) | \
        ({"tokens_ahead", "scan_stack", "MTPModule", "Embed", "RMSNorm"} & imported)
    assert not copies, f"pipelined.py re-implements part of the forward: uses {copies}"
