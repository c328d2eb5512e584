"""The modules form layers without cycles: a module imports only from its own layer and the
layers below it, and no chain of imports leads back to where it started. Imports inside
functions count as much as those at the top (they are dependencies all the same)."""

import ast
from pathlib import Path

import slowrun

SRC = Path(slowrun.__file__).parent

# lowest first; a module may import from its own layer and from the layers before it
LAYERS = [
    # what every layer uses: the config, file writing and reading, the committed formats, the run
    # directory and its result.json, the run log, the torchrun environment, the step arithmetic
    ("base", {"__init__", "config", "storage", "formats", "rundir", "results", "runlog", "distributed", "steps"}),
    ("data", {"sources", "tokenizer", "prepare", "dataset", "loader"}),
    ("model", {"gpt", "losses", "techniques", "optim", "averaging", "checkpoint", "evaluate", "sample"}),
    ("training", {"train", "schedules", "curriculum", "final_eval", "plan", "speed"}),
    # what is made of finished runs: the ledger, data efficiency, records, the HTML report
    ("reports", {"ledger", "efficiency", "records", "report"}),
    # what trains many runs: jobs, sweeps, ablations, ensembles, the CPU track
    ("experiments", {"jobs", "sweep", "ablate", "ensemble", "track"}),
    ("cli", {"cli", "commands", "docgen", "__main__"}),
]


def import_graph(src: Path = SRC) -> dict[str, set[str]]:
    """Module -> the slowrun modules it imports, at the top or inside a function (a name of the
    package itself, `from . import SlowrunError`, is an import of `__init__`)."""
    modules = {p.stem for p in src.glob("*.py")}
    graph = {}
    for path in sorted(src.glob("*.py")):
        deps = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom):
                if node.level == 1 or node.module == "slowrun":
                    names = [node.module] if node.level == 1 and node.module else [a.name for a in node.names]
                elif node.level == 0 and (node.module or "").startswith("slowrun."):
                    names = [node.module.split(".")[1]]
                else:
                    continue
            elif isinstance(node, ast.Import):
                names = [a.name.split(".")[1] for a in node.names if a.name.startswith("slowrun.")]
            else:
                continue
            deps |= {n.split(".")[0] if n.split(".")[0] in modules else "__init__" for n in names}
        graph[path.stem] = deps - {path.stem}
    return graph


def layer_problems(graph: dict[str, set[str]], layers: list[tuple[str, set[str]]]) -> list[str]:
    """One line per module without a layer (or a layer's module that does not exist), per import
    of a higher layer, and per import cycle."""
    rank = {m: (i, name) for i, (name, mods) in enumerate(layers) for m in mods}
    problems = [f"{m} has no layer: add it to LAYERS in tests/test_layers.py" for m in sorted(graph) if m not in rank]
    problems += [f"LAYERS names {m}, which is not a module" for m in sorted(rank) if m not in graph]
    for m in sorted(graph):
        for d in sorted(graph[m]):
            if m in rank and d in rank and rank[d][0] > rank[m][0]:
                problems.append(f"{m} ({rank[m][1]}) imports {d} ({rank[d][1]}), a higher layer")
    return problems + [f"cycle: {' -> '.join(c)}" for c in cycles(graph)]


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every import cycle a depth-first walk meets, each once, starting at its first module by name."""
    found, state = set(), {}  # state: 1 = on the current path, 2 = done

    def walk(m: str, path: list[str]) -> None:
        state[m] = 1
        for d in sorted(graph.get(m, ())):
            if state.get(d) == 1:
                loop = path[path.index(d):]
                i = loop.index(min(loop))
                found.add(tuple(loop[i:] + loop[:i]))
            elif d not in state:
                walk(d, path + [d])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            walk(m, [m])
    return [[*c, c[0]] for c in sorted(found)]


def test_the_modules_form_layers_without_cycles():
    assert layer_problems(import_graph(), LAYERS) == []


def test_a_module_without_a_layer_an_upward_import_and_a_cycle_are_named(tmp_path):
    """The check can fail: a fake package with each fault is refused, one line each."""
    files = {"__init__": "class SlowrunError(ValueError): ...\n",
             "low": "from . import SlowrunError\n\ndef f():\n    from .high import g  # upward, inside a function\n",
             "high": "from slowrun.low import f\nimport slowrun.ring_a\n",
             "ring_a": "from .ring_b import x\n", "ring_b": "from . import ring_c\n", "ring_c": "from .ring_a import y\n",
             "stray": "import json\n"}
    for name, text in files.items():
        (tmp_path / f"{name}.py").write_text(text)
    graph = import_graph(tmp_path)
    assert graph["low"] == {"__init__", "high"} and graph["high"] == {"low", "ring_a"} and graph["ring_b"] == {"ring_c"}
    layers = [("base", {"__init__", "low", "ring_a", "ring_b", "ring_c"}), ("top", {"high", "gone"})]
    assert layer_problems(graph, layers) == [
        "stray has no layer: add it to LAYERS in tests/test_layers.py",
        "LAYERS names gone, which is not a module",
        "low (base) imports high (top), a higher layer",
        "cycle: high -> low -> high",
        "cycle: ring_a -> ring_b -> ring_c -> ring_a",
    ]
