"""The layers of the package (README, Architecture): a module imports only from its own layer or below,
lazy imports inside functions included, and no two modules import each other, directly or around a loop."""
import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "edgeus"

# (layer, module prefixes); the longest matching prefix decides a module's layer
LAYERS = [
    (0, ["edgeus.errors", "edgeus.resources", "edgeus.threads", "edgeus.stats", "edgeus.curves", "edgeus.lazy",
         "edgeus.decompose.config", "edgeus.deploy.config", "edgeus.distill.config", "edgeus.prune.config",
         "edgeus.quantize.config"]),                                       # foundations and settings schemas
    (1, ["edgeus.models", "edgeus.data", "edgeus.train.checkpoint"]),      # architectures, data, model files
    (2, ["edgeus.config"]),                                                # composition of the settings
    (3, ["edgeus.onnx", "edgeus.evaluate", "edgeus.segmentation", "edgeus.deploy.runners",
         "edgeus.deploy.device_probe", "edgeus.deploy.manifest", "edgeus.deploy.versions"]),  # running models
    (4, ["edgeus.train", "edgeus.distill"]),                               # training and distillation
    (5, ["edgeus.finetune", "edgeus.prune", "edgeus.decompose", "edgeus.quantize", "edgeus.deploy"]),  # stages
    (6, ["edgeus.pipeline", "edgeus.explain"]),                            # compress: composing the stages
    (7, ["edgeus.commands", "edgeus.cli", "edgeus.app"]),                  # front-ends
]


def _layer(mod: str):
    best = None
    for layer, prefixes in LAYERS:
        for p in prefixes:
            if (mod == p or mod.startswith(p + ".")) and (best is None or len(p) > best[1]):
                best = (layer, len(p))
    return best[0] if best else None


def _modules() -> dict[str, Path]:
    mods = {}
    for f in PKG.rglob("*.py"):
        parts = list(f.relative_to(PKG.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        mods[".".join(parts)] = f
    return mods


def _imports(mod: str, path: Path) -> set[str]:
    out = set()
    is_pkg = path.name == "__init__.py"
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                here = mod.split(".") if is_pkg else mod.split(".")[:-1]
                base = ".".join(here[: len(here) - (node.level - 1)] + ([base] if base else []))
            out.add(base)
            out.update(f"{base}.{a.name}" for a in node.names)
    return {m for m in out if m.startswith("edgeus.")}


def _resolve(name: str, mods) -> str | None:
    while name and name not in mods:
        name = name.rpartition(".")[0]
    return name or None


def test_every_module_has_a_layer_and_imports_nothing_above_it():
    mods = _modules()
    unplaced = sorted(m for m in mods if m != "edgeus" and _layer(m) is None)
    assert not unplaced, f"give these modules a layer in LAYERS (and the README): {unplaced}"
    upward = sorted(f"{m} ({_layer(m)}) imports {t} ({_layer(t)})" for m, p in mods.items() if m != "edgeus"
                    for t in _imports(m, p) if _layer(t) is not None and _layer(t) > _layer(m)
                    and not m.startswith(t + "."))
    assert not upward, "imports against the layering:\n" + "\n".join(upward)


def test_no_import_cycles():
    mods = _modules()
    edges = {m: set() for m in mods}
    for m, p in mods.items():
        for t in _imports(m, p):
            r = _resolve(t, mods)
            if r and r != m and not m.startswith(r + "."):   # a module importing its own package face is fine
                edges[m].add(r)
    index, low, stack, on, cycles, counter = {}, {}, [], set(), [], [0]

    def visit(v):      # Tarjan's strongly connected components
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in edges[v]:
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
                cycles.append(sorted(comp))

    for v in edges:
        if v not in index:
            visit(v)
    assert not cycles, f"import cycles: {cycles}"
