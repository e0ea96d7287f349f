"""The package's structure, read from its source (AST, nothing executed): layers that import only
downward, no import cycles, function-local imports only where a comment says why, no PartitionSpec
outside parallel/, and one forward pass."""

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


# Top down: a module may import its own layer or any layer below, never one above.
LAYERS = (
    ("entry point", ("dsv3_jax.cli",)),
    ("jobs", ("dsv3_jax.jobs",)),  # what a command runs: train / sft / grpo, compare, plan, compile, bench
    ("run library", ("dsv3_jax.train", "dsv3_jax.post", "dsv3_jax.data", "dsv3_jax.infer", "dsv3_jax.interop",
                     "dsv3_jax.checkpoint", "dsv3_jax.validate", "dsv3_jax.report", "dsv3_jax.info")),
    ("model", ("dsv3_jax.model",)),
    ("policies", ("dsv3_jax.parallel", "dsv3_jax.quant")),  # consulted by the model, never the reverse
    ("ground", ("dsv3_jax.config", "dsv3_jax.errors", "dsv3_jax.platform", "dsv3_jax.host_platform",
                "dsv3_jax.host_memory", "dsv3_jax.hlo_stats", "dsv3_jax.targets", "dsv3_jax.run_dir",
                "pallas_kernels")),
)


def layer_of(module: str) -> int:
    """Index into LAYERS (0 = top); the package roots sit at the bottom."""
    if module in PACKAGES:
        return len(LAYERS) - 1
    for i, (_, prefixes) in enumerate(LAYERS):
        if any(module == p or module.startswith(p + ".") for p in prefixes):
            return i
    raise AssertionError(f"{module} is in no layer of tests/test_structure.py LAYERS: place it")


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    return sorted(f"{m} ({LAYERS[layer_of(m)][0]}) imports {t} ({LAYERS[layer_of(t)][0]})"
                  for m, targets in graph.items() for t in targets if layer_of(t) < layer_of(m))


def uncommented_local_imports(modules: dict[str, Path]) -> list[str]:
    """Imports of the package's own modules inside a function body with no comment on their line
    or the line above (a lazy import must say why it is lazy)."""
    out = []
    for module, path in modules.items():
        source = path.read_text()
        lines = source.splitlines()
        for fn in ast.walk(ast.parse(source)):
            if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for node in ast.walk(fn):
                if isinstance(node, ast.ImportFrom):
                    names = [("." * node.level) + (node.module or "")]
                elif isinstance(node, ast.Import):
                    names = [alias.name for alias in node.names]
                else:
                    continue
                if not any(n.startswith(".") or n.split(".")[0] in PACKAGES for n in names):
                    continue
                here, above = lines[node.lineno - 1], lines[node.lineno - 2] if node.lineno > 1 else ""
                if "#" not in here and not above.strip().startswith("#"):
                    out.append(f"{path.relative_to(ROOT)}:{node.lineno} {names[0]}")
    return out


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


def test_imports_run_only_downward_through_the_layers():
    graph = import_graph(_modules())
    assert upward_imports(graph) == []
    # The check sees a planted upward import.
    planted = {**graph, "dsv3_jax.model.moe": graph["dsv3_jax.model.moe"] | {"dsv3_jax.train.step"}}
    assert upward_imports(planted) == ["dsv3_jax.model.moe (model) imports dsv3_jax.train.step (run library)"]


def test_function_local_package_imports_say_why():
    modules = _modules()
    assert uncommented_local_imports(modules) == []
    planted = ROOT / "tests" / "fixtures" / "lazy_import_probe.py"
    assert uncommented_local_imports({"probe": planted}) == [
        "tests/fixtures/lazy_import_probe.py:4 dsv3_jax.config"], "the scan sees an uncommented local import"


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
