"""The import contract of kdrun/ (../shared/DESIGN.md, README "Layers"): five layers, a module imports only from its
own layer or below, and no module reaches itself through its imports. Read from grimp's graph of the installed
package, function-level imports included (grimp reads every import statement, wherever it stands)."""
import pytest

grimp = pytest.importorskip("grimp", reason="the test extra installs grimp (pip install -e '.[test]')")

# lowest first; a module's layer is that of its longest matching prefix
LAYERS = {
    "foundation": ["kdrun", "kdrun.errors", "kdrun.names", "kdrun.store", "kdrun.tags", "kdrun.progress",
                   "kdrun.secrets", "kdrun.signals", "kdrun.models", "kdrun.data"],
    "engine": ["kdrun.runtime", "kdrun.checkpoint", "kdrun.train", "kdrun.tracking", "kdrun.logged_model",
               "kdrun.model_card"],
    "domain": ["kdrun.losses", "kdrun.tasks", "kdrun.teacher_cache", "kdrun.finetune", "kdrun.eval_cache"],
    "orchestration": ["kdrun.config", "kdrun.pipeline", "kdrun.sweep", "kdrun.stages", "kdrun.summary"],
    "entry": ["kdrun.__main__", "kdrun.cli", "kdrun.usage", "kdrun.ui", "kdrun.report", "kdrun.rerun", "kdrun.bench"],
}
# Known exceptions, each to go with a named change (the test fails once one is gone, so the lists only shrink):
UPWARD: set = set()  # (importer, imported) pairs, each with the change that removes it
CYCLES = {
    # a family's Family (torch-free) calls its teacher fine-tune, which builds the family's Task, which names the
    # Family: goes when the fine-tunes move into kdrun/teachers/ (the architecture issue's TeacherSource)
    frozenset({"kdrun.tasks.ranking", "kdrun.tasks.ranking.finetune", "kdrun.tasks.ranking.task"}),
    frozenset({"kdrun.tasks.classification", "kdrun.tasks.classification.finetune",
               "kdrun.tasks.classification.task"}),
}


@pytest.fixture(scope="module")
def graph():
    return grimp.build_graph("kdrun", cache_dir=None)


def _layer(module: str) -> int:
    best = max(((i, len(p)) for i, prefixes in enumerate(LAYERS.values()) for p in prefixes
                if module == p or module.startswith(p + ".")), key=lambda x: x[1], default=None)
    assert best is not None, f"{module} has no layer: add it to LAYERS here and to README's table"
    return best[0]


def _cycles(graph) -> set:
    """The strongly connected components of more than one module (Tarjan's algorithm, iteratively)."""
    edges = {m: sorted(graph.find_modules_directly_imported_by(m)) for m in graph.modules}
    index, low, stack, on, found, counter = {}, {}, [], set(), set(), [0]
    for root in sorted(edges):
        if root in index:
            continue
        work = [(root, 0)]
        while work:
            v, i = work.pop()
            if i == 0:
                index[v] = low[v] = counter[0]
                counter[0] += 1
                stack.append(v)
                on.add(v)
            for j in range(i, len(edges[v])):
                w = edges[v][j]
                if w not in index:
                    work += [(v, j + 1), (w, 0)]
                    break
                if w in on:
                    low[v] = min(low[v], index[w])
            else:
                if low[v] == index[v]:
                    comp = set()
                    while True:
                        w = stack.pop()
                        on.discard(w)
                        comp.add(w)
                        if w == v:
                            break
                    if len(comp) > 1:
                        found.add(frozenset(comp))
                if work:
                    parent = work[-1][0]
                    low[parent] = min(low[parent], low[v])
    return found


def test_every_module_has_a_layer_and_imports_none_above_it(graph):
    upward = {(a, b) for a in graph.modules for b in graph.find_modules_directly_imported_by(a)
              if _layer(b) > _layer(a)}
    assert upward - UPWARD == set(), "imports from a higher layer (move the shared name down): " + str(
        sorted(f"{a} -> {b}" for a, b in upward - UPWARD))
    assert UPWARD - upward == set(), f"gone (well done): take them out of UPWARD: {sorted(UPWARD - upward)}"


def test_no_module_reaches_itself_through_its_imports(graph):
    cycles = _cycles(graph)
    assert cycles - CYCLES == set(), "import cycles: " + str([sorted(c) for c in cycles - CYCLES])
    assert CYCLES - cycles == set(), f"gone (well done): take them out of CYCLES: {[sorted(c) for c in CYCLES - cycles]}"


def test_the_cycle_finder_finds_a_cycle_and_the_layers_an_upward_import():
    """The contract's own check on a graph made here: a -> b -> c -> a is one cycle, d alone none."""
    g = grimp.ImportGraph()
    for m in ("kdrun", "kdrun.a", "kdrun.b", "kdrun.c", "kdrun.d"):
        g.add_module(m)
    for a, b in (("kdrun.a", "kdrun.b"), ("kdrun.b", "kdrun.c"), ("kdrun.c", "kdrun.a"), ("kdrun.d", "kdrun.a")):
        g.add_import(importer=a, imported=b)
    assert _cycles(g) == {frozenset({"kdrun.a", "kdrun.b", "kdrun.c"})}
    assert _layer("kdrun.data.tokens") < _layer("kdrun.train") < _layer("kdrun.tasks.ranking.task") < \
        _layer("kdrun.pipeline") < _layer("kdrun.cli")
    assert _layer("kdrun") == 0 and _layer("kdrun.bench.scale") == 4
