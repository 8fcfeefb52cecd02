"""The import graph of ptkernels/ (module-level and function-level imports) has no cycle, no module
but the package root imports the package root, and ptkernels.integrations / ptkernels.prompts
import no private name of another module."""
import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parent.parent / "ptkernels"


def _modules():
    mods = {}
    for f in ROOT.rglob("*.py"):
        parts = list(f.relative_to(ROOT.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        mods[".".join(parts)] = f
    return mods


MODS = _modules()


def _targets(cur, node):
    """(module imported, names imported from it) for one import statement of module ``cur``."""
    pkg = cur.split(".") if MODS[cur].name == "__init__.py" else cur.split(".")[:-1]
    if isinstance(node, ast.ImportFrom):
        if node.level:
            base = ".".join(pkg[:len(pkg) - (node.level - 1)] + ([node.module] if node.module else []))
        else:
            base = node.module or ""
        out = []
        for a in node.names:
            full = f"{base}.{a.name}"
            out.append((full, None) if full in MODS else (base, a.name))
        return out
    return [(a.name, None) for a in node.names]


def _owner(name):
    while name and name not in MODS:
        name = name.rpartition(".")[0]
    return name


def _graph():
    graph = {m: set() for m in MODS}
    names = []
    for m, f in MODS.items():
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                for target, name in _targets(m, node):
                    t = _owner(target)
                    # a package's __init__ re-exporting its own submodules is not an upward edge
                    if t and t != m and not t.startswith(m + "."):
                        graph[m].add(t)
                        names.append((m, t, name))
    return graph, names


def _cycles(graph):
    index, low, stack, on, sccs, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
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
                sccs.append(sorted(comp))
    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sccs


def test_no_import_cycles_outside_known_triton_one():
    cycles = _cycles(_graph()[0])
    # backends/triton's attention_fwd <-> decode cycle is another helper's (issue 10, triton bullet)
    cycles = [c for c in cycles if not all(m.startswith("ptkernels.backends.triton") for m in c)]
    assert not cycles, cycles


def test_integrations_and_prompts_have_no_cycle_at_all():
    graph, _ = _graph()
    sub = {m: {t for t in ts if t.startswith(("ptkernels.integrations", "ptkernels.prompts"))}
           for m, ts in graph.items() if m.startswith(("ptkernels.integrations", "ptkernels.prompts"))}
    assert not _cycles(sub)


def test_layers_below_the_public_api_never_import_the_root():
    """integrations -> prompts -> ops -> backends never reach up to ``ptkernels/__init__``
    (the compiled extension ``ptkernels._C`` is not a Python module of the graph)."""
    graph, names = _graph()
    below = ("ptkernels.integrations", "ptkernels.prompts", "ptkernels.ops")
    up = [(m, n) for m, t, n in names if t == "ptkernels" and m.startswith(below) and n != "_C"]
    assert not up, up


def test_no_private_names_imported_across_modules():
    _, names = _graph()
    bad = [(m, t, n) for m, t, n in names
           if m.startswith(("ptkernels.integrations", "ptkernels.prompts"))
           and n is not None and n.startswith("_") and not n.startswith("__")]
    assert not bad, bad


def test_integrations_layers_point_down():
    """state <- transformers (attention/mask functions) <- architectures <- patching <- {peft,
    prompt_attach} <- adapters, patch; no module imports a layer above its own."""
    layer = {"state": 0, "compat": 0, "transformers": 1, "architectures": 2, "checkpointing": 2,
             "patching": 3, "peft": 4, "prompt_attach": 4, "adapters": 5, "patch": 5,
             "prompt_files": 0, "ptk_adapter": 5, "export": 5}
    graph, _ = _graph()
    for m, targets in graph.items():
        if not m.startswith("ptkernels.integrations."):
            continue
        mine = layer[m.split(".")[2]]
        for t in targets:
            if t.startswith("ptkernels.integrations."):
                part = t.split(".")[2]
                assert layer[part] <= mine, f"{m} imports {t} (a layer above it)"
                assert {part, m.split(".")[2]} != {"peft", "prompt_attach"}, \
                    "the PEFT path and the config path are siblings"
