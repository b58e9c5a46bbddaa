"""The project's import graph: no cycles, and the layers import downwards only (models and data
never import config.py, models never import data), read from the source with `ast` so that imports
inside functions count too; and `import models` loads no data module at run time."""
import ast
import os
import subprocess
import sys

from tests.conftest import ROOT

SKIPPED_DIRS = {'.venv', '.git', 'tests', 'output', '__pycache__'}


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
    base = base[:len(base) - (level - 1)]
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
                return stack[stack.index(nxt):] + [nxt]
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
    assert {'utils.config_checks', 'utils.config_merge', 'utils.arguments'} <= graph['config']
    assert 'models.registry' in graph['models.architectures']  # relative import
    assert 'models' in graph['checkpoint.weights']  # the package runs before models.registry
    assert 'models.registry' in graph['data.loader']  # an import inside a function counts


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


def test_errors_and_tasks_are_leaf_modules():
    graph = import_graph()
    assert graph['utils.errors'] == set() and graph['utils.tasks'] == set()


def test_import_models_loads_no_data_module_and_no_config():
    code = ("import sys, models; "
            "print(sorted(m for m in sys.modules if m == 'config' or m.split('.')[0] == 'data'))")
    out = subprocess.run([sys.executable, '-c', code], cwd=ROOT, capture_output=True, text=True,
                         check=True).stdout
    assert out.strip() == '[]'
