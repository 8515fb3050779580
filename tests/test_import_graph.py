"""The house's dependency rules, read from the source (no module is imported).

- The library's core (models, schedulers, text, conditioning, pipelines, training, data, parallel and the
  low-level modules beside them) never imports `convert`, at module level or inside a function.
- No two files import each other, directly or through a chain (no import circles), counting imports inside
  functions too: a function-local import may defer a heavy dependency, never hide a circle.
"""

from __future__ import annotations

import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parent.parent
PACKAGES = ("opensora_jax", "convert")
# Layers above the core: they may convert reference weights on the fly, so they may import `convert`.
ALLOWED_TO_IMPORT_CONVERT = ("opensora_jax.cli", "opensora_jax.tools", "opensora_jax.app")


def _module_name(path: pathlib.Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, pathlib.Path]:
    found = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            found[_module_name(path)] = path
    return found


def _resolve(name: str, modules) -> str | None:
    """The longest prefix of dotted `name` that is one of our modules."""
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def _imports(path: pathlib.Path, modules) -> list[tuple[str, int]]:
    """(imported module of ours, line) for every import statement in the file, at any depth."""
    module = _module_name(path)
    is_package = path.name == "__init__.py"
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        names = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = module.split(".")
                anchor = anchor if is_package else anchor[:-1]
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            # `from pkg import sub` imports the submodule when there is one.
            names = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names]
        for name in names:
            target = _resolve(name, modules)
            if target is not None and target != module:
                out.append((target, node.lineno))
    return out


def _graph():
    modules = _modules()
    graph = {}
    for name, path in modules.items():
        edges = {}
        for target, line in _imports(path, modules):
            # A package's __init__ runs when any of its submodules is imported: that edge is not a choice.
            if name.startswith(target + "."):
                continue
            edges.setdefault(target, line)
        graph[name] = edges
    return graph


def _is_core(module: str) -> bool:
    return module.startswith("opensora_jax") and not module.startswith(ALLOWED_TO_IMPORT_CONVERT)


def test_the_core_never_imports_convert():
    offenders = [f"{module} imports {target} (line {line})"
                 for module, edges in _graph().items() if _is_core(module)
                 for target, line in edges.items() if target == "convert" or target.startswith("convert.")]
    assert not offenders, "the library's core must not import convert:\n" + "\n".join(offenders)


def test_no_import_circles():
    graph = _graph()
    index, low, stack, on_stack, cycles = {}, {}, [], set(), []

    def visit(node):  # Tarjan's strongly connected components
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in graph.get(node, {}):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for node in graph:
        if node not in index:
            visit(node)
    assert not cycles, "import circles between files:\n" + "\n".join(" <-> ".join(c) for c in cycles)


def test_the_checker_sees_function_local_imports(tmp_path):
    """The graph counts an import inside a function like one at the top (what hid the old circles)."""
    modules = {"opensora_jax.a": None, "opensora_jax.b": None, "convert": None, "convert.registry": None}
    source = tmp_path / "opensora_jax" / "a.py"
    source.parent.mkdir()
    source.write_text("def f():\n    from convert.registry import load_model\n    from opensora_jax import b\n")
    global ROOT
    saved, ROOT = ROOT, tmp_path
    try:
        found = {target for target, _ in _imports(source, modules)}
    finally:
        ROOT = saved
    assert found == {"convert.registry", "opensora_jax.b"}
