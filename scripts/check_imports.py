"""Fail on any import cycle inside chatglm/ and on any import from a higher layer (README, "Layout"). Every import
statement counts, at module level or inside a function: a lazy import still ties the two modules together.

    python scripts/check_imports.py [PACKAGE_DIR]
"""
import ast
import sys
from pathlib import Path

# Lowest first; a module may import its own layer and the ones below. Keys are module names or package prefixes
# ("chatglm.chat" covers chatglm.chat.*); the longest match wins.
LAYERS = [
    ["chatglm.models", "chatglm.kernels", "chatglm.demo:__init__"],  # (the demo package: only its model's path)
    ["chatglm.memory"],
    ["chatglm.quantize"],
    ["chatglm.checkpoint"],
    ["chatglm.fastpath"],
    ["chatglm.tokenizer", "chatglm.sampling", "chatglm.cache", "chatglm.generate", "chatglm.static"],
    ["chatglm.engine"],
    ["chatglm.chat"],
    ["chatglm.auto"],
    ["chatglm.serve", "chatglm.bench", "chatglm.train", "chatglm.demo"],
    ["chatglm.cli", "chatglm.__main__", "chatglm:__init__"],  # (the package's own __init__: its public API)
]


def modules(root: Path) -> dict[str, Path]:
    """Module name -> file for every .py file under the package directory `root`."""
    out = {}
    for f in sorted(root.rglob("*.py")):
        parts = list(f.relative_to(root.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = f
    return out


def layer(name: str, is_package: bool) -> int | None:
    best, rank = -1, None
    for i, entries in enumerate(LAYERS):
        for e in entries:
            prefix, _, only = e.partition(":")
            if only == "__init__":
                hit = is_package and name == prefix
            else:
                hit = name == prefix or name.startswith(prefix + ".")
            if hit and len(prefix) + bool(only) > best:
                best, rank = len(prefix) + bool(only), i
    return rank


def imports(name: str, path: Path, known: dict[str, Path]) -> list[tuple[str, int]]:
    """(imported module inside the package, line) for every import statement in the file."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = []
    for node in ast.walk(ast.parse(path.read_text("utf-8"), str(path))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module
            # `from pkg import sub` imports the submodule pkg.sub when there is one, else a name from pkg
            targets = [f"{mod}.{a.name}" if f"{mod}.{a.name}" in known else mod for a in node.names]
        else:
            continue
        for t in targets:
            while t and t not in known:  # `import chatglm.x.y` of a name inside a module: the module
                t = t.rpartition(".")[0]
            if t and t != name:
                out.append((t, node.lineno))
    return out


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    sys.setrecursionlimit(10000)
    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def check(root: Path) -> list[str]:
    known = modules(root)
    errors, graph = [], {n: set() for n in known}
    for name, path in known.items():
        mine = layer(name, path.name == "__init__.py")
        if mine is None:
            errors.append(f"{path}: {name} is in no layer of scripts/check_imports.py's LAYERS; add it there")
            continue
        for target, line in sorted(set(imports(name, path, known))):
            graph[name].add(target)
            theirs = layer(target, known[target].name == "__init__.py")
            if theirs is not None and theirs > mine:
                errors.append(f"{path}:{line}: {name} (layer {mine}) imports {target} (layer {theirs}), a higher "
                              f"layer")
    for comp in cycles(graph):
        errors.append(f"import cycle: {' <-> '.join(comp)}")
    return errors


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    root = Path(argv[0]) if argv else Path(__file__).resolve().parent.parent / "chatglm"
    errors = check(root)
    for e in errors:
        print(e, file=sys.stderr)
    if not errors:
        print(f"check_imports: {len(modules(root))} modules under {root}, no cycle, no import from a higher layer")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
