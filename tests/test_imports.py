"""The project's import graph, read from the source with `ast` (imports inside functions count
too): no cycles; every import goes down the layer order of LAYERS (docs/architecture.md); project
modules are imported at the top of a file, never deferred; each name is imported from the module
that defines it; and `import models` loads no data module at run time."""

import ast
import os
import subprocess
import sys

from tests.conftest import ROOT

SKIPPED_DIRS = {'.venv', '.git', 'tests', 'output', '__pycache__'}
# The rooms of the repository (top-level folders and files), lowest first. A module may import its
# own room and the rooms of lower layers, never a room of its own layer or a higher one.
LAYERS = (
    ('utils', 'logger'),  # leaves: errors, file I/O, distributed primitives, key helpers
    ('models',),  # the encoders, heads, targets, the SimMIM wrapper
    ('data',),  # datasets, masks, transforms, loaders (reads the model registry's patch size)
    ('optimizer', 'lr_scheduler'),
    ('config',),  # defaults, loading, validation (asks every unit below to check its keys)
    ('checkpoint',),  # file and sharded layouts, resume, official and timm/pretrained weights
    ('engine',),  # the training loop and what runs a job
    ('main_simmim', 'main_finetune'),
    ('tools',),
    ('benchmarks',),
)
# Imports of project modules inside a function, with the reason (none may dodge a cycle).
DEFERRED = {
    # A row of the speed table imports either our code or the official SimMIM code (same module
    # names, first on its sys.path) into a fresh process; the parent process imports neither.
    'benchmarks.speed': 'rows import our code or the official code in their own process',
}


def project_modules():
    """{module name: file path} of every module of the repository outside tests/."""
    modules = {}
    for folder, dirs, files in os.walk(ROOT):
        dirs[:] = [d for d in dirs if d not in SKIPPED_DIRS and not d.startswith('.')]
        rel = os.path.relpath(folder, ROOT)
        package = [] if rel == '.' else rel.split(os.sep)
        for name in files:
            if name.endswith('.py'):
                stem = name[:-3]
                parts = package if stem == '__init__' else package + [stem]
                if parts:
                    modules['.'.join(parts)] = os.path.join(folder, name)
    return modules


def _resolve_from(module, is_package, level, name):
    """The absolute module of `from <level dots><name> import ...` inside `module`."""
    if not level:
        return name
    base = module.split('.') if is_package else module.split('.')[:-1]
    base = base[: len(base) - (level - 1)]
    return '.'.join(base + ([name] if name else []))


def imported_modules(module, path, modules):
    """Project modules that `module` imports anywhere in its file (function bodies included). An
    import of a.b.c also runs the packages a and a.b, unless `module` lives inside them already."""
    tree = ast.parse(open(path).read(), path)
    is_package = path.endswith('__init__.py')
    targets = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = _resolve_from(module, is_package, node.level, node.module)
            for alias in node.names:
                submodule = f'{base}.{alias.name}'
                targets.add(submodule if submodule in modules else base)
    found = set()
    for target in targets:
        parts = target.split('.')
        for i in range(1, len(parts) + 1):
            name = '.'.join(parts[:i])
            inside = module == name or module.startswith(name + '.')
            if name in modules and name != module and (i == len(parts) or not inside):
                found.add(name)
    return found


def import_graph():
    modules = project_modules()
    return {m: imported_modules(m, path, modules) for m, path in modules.items()}


def find_cycle(graph):
    """One import cycle as a list of modules (first == last), or None."""
    state, stack = {}, []

    def visit(node):
        state[node] = 'open'
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 'open':
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state:
                cycle = visit(nxt)
                if cycle:
                    return cycle
        stack.pop()
        state[node] = 'done'
        return None

    for node in sorted(graph):
        if node not in state:
            cycle = visit(node)
            if cycle:
                return cycle
    return None


def test_the_graph_reader_sees_what_the_files_import():
    graph = import_graph()
    assert {'config', 'models.registry', 'utils.tasks'} <= set(graph)
    assert {'utils.config_merge', 'utils.arguments'} <= graph['config']
    assert 'models.registry' in graph['models.architectures']  # relative import
    assert 'models' in graph['checkpoint.weights']  # the package runs before models.registry
    assert 'engine.compilation' in graph['benchmarks.speed']  # an import inside a function counts


def room(module):
    return module.split('.')[0]


def layer_of(module):
    """The index in LAYERS of `module`'s room."""
    return next(i for i, rooms in enumerate(LAYERS) if room(module) in rooms)


def climbing_imports(graph):
    """(importer, imported) pairs that go sideways or up the layer order."""
    return sorted(
        (module, target)
        for module, imports in graph.items()
        for target in imports
        if room(target) != room(module) and layer_of(target) >= layer_of(module)
    )


def test_every_room_has_a_layer():
    rooms = {room(module) for module in import_graph()}
    assert rooms == {r for layer in LAYERS for r in layer}


def test_the_layer_check_catches_a_climbing_and_a_sideways_import():
    graph = {
        'utils.x': {'models.y'},
        'optimizer': {'lr_scheduler'},
        'models.y': {'utils.x'},
        'data.z': {'data.w', 'models.y'},
    }
    assert climbing_imports(graph) == [('optimizer', 'lr_scheduler'), ('utils.x', 'models.y')]


def test_imports_go_down_the_layer_order():
    assert climbing_imports(import_graph()) == []


def deferred_imports(path):
    """Project modules imported inside a function (or a class) of the file at `path`."""
    tree = ast.parse(open(path).read(), path)
    top = {id(node) for node in tree.body}
    rooms = {r for layer in LAYERS for r in layer}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)) and id(node) not in top:
            names = (
                [a.name for a in node.names]
                if isinstance(node, ast.Import)
                else [node.module or '']
            )
            if getattr(node, 'level', 0) or any(room(n) in rooms for n in names):
                found.append(node.lineno)
    return found


def test_project_modules_are_imported_at_the_top_of_a_file():
    deferred = {
        module: lines
        for module, path in project_modules().items()
        if (lines := deferred_imports(path)) and module not in DEFERRED
    }
    assert deferred == {}
    assert all(deferred_imports(project_modules()[module]) for module in DEFERRED)


def defined_names(path):
    """Names a module's top level defines itself (functions, classes, assignments), and, for a
    package, what its __all__ exports."""
    tree = ast.parse(open(path).read(), path)
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names.update(n.id for t in targets for n in ast.walk(t) if isinstance(n, ast.Name))
            if any(getattr(t, 'id', None) == '__all__' for t in targets):
                names.update(ast.literal_eval(node.value))
    return names


def borrowed_names(modules, importers):
    """'file:line name' of every `from M import name` in `importers` ({module: path}) that takes
    from the project module M a name M only imports itself (a second address for it)."""
    found = []
    for module, path in importers.items():
        tree = ast.parse(open(path).read(), path)
        for node in ast.walk(tree):
            if not isinstance(node, ast.ImportFrom):
                continue
            target = _resolve_from(module, path.endswith('__init__.py'), node.level, node.module)
            if target not in modules or module in DEFERRED:
                continue
            defined = defined_names(modules[target])
            found += [
                f'{os.path.relpath(path, ROOT)}:{node.lineno} {alias.name}'
                for alias in node.names
                if alias.name not in defined and f'{target}.{alias.name}' not in modules
            ]
    return found


def test_each_name_is_imported_from_the_module_that_defines_it():
    modules = project_modules()
    tests = {
        f'tests.{name[:-3]}': os.path.join(ROOT, 'tests', name)
        for name in os.listdir(os.path.join(ROOT, 'tests'))
        if name.endswith('.py')
    }
    assert borrowed_names(modules, {**modules, **tests}) == []


def test_find_cycle_reports_a_cycle_and_accepts_a_tree():
    assert find_cycle({'a': {'b'}, 'b': {'c'}, 'c': {'a'}}) == ['a', 'b', 'c', 'a']
    assert find_cycle({'a': {'b', 'c'}, 'b': {'c'}, 'c': set()}) is None


def test_the_project_has_no_import_cycle():
    assert find_cycle(import_graph()) is None


def test_models_and_data_do_not_import_config_and_models_do_not_import_data():
    graph = import_graph()
    for module, imports in graph.items():
        if module.split('.')[0] in ('models', 'data'):
            assert 'config' not in imports, module
        if module.split('.')[0] == 'models':
            assert not {m for m in imports if m.split('.')[0] == 'data'}, module


def test_import_models_loads_no_data_module_and_no_config():
    code = (
        'import sys, models; '
        "print(sorted(m for m in sys.modules if m == 'config' or m.split('.')[0] == 'data'))"
    )
    out = subprocess.run(
        [sys.executable, '-c', code], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout
    assert out.strip() == '[]'


def test_no_room_holds_more_than_a_quarter_of_the_code():
    lines = {}
    for module, path in project_modules().items():
        with open(path) as f:
            lines[room(module)] = lines.get(room(module), 0) + sum(1 for _ in f)
    total = sum(lines.values())
    assert {r: n for r, n in lines.items() if n > total / 4} == {}
