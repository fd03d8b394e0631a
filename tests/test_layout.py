"""The layout contracts of the project: the imports form a tree (no cycle) with the method scripts on top, and the
code that a method file copies from another (method files never import each other) stays an exact copy."""
import ast
import re

import pytest

from conftest import ROOT

MODULES = sorted(p.stem for p in ROOT.glob("*.py"))
METHODS = {"finetune", "orca", "pare", "mona", "proposed", "ups", "bench"}


def project_imports(name):
    """Project modules imported anywhere in NAME.py (top level or inside functions)."""
    tree = ast.parse((ROOT / f"{name}.py").read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module.split(".")[0])
    return found & set(MODULES) - {name}


def test_imports_form_a_tree_with_the_methods_on_top():
    graph = {m: project_imports(m) for m in MODULES}
    for method in (METHODS - {"bench"}) & set(MODULES):  # bench.py times the methods: it sits above them
        others = graph[method] & (METHODS - {"bench"})
        assert not others, f"{method}.py imports method file(s) {others}: method files never import each other"
    for m in set(MODULES) - METHODS:
        assert not graph[m] & METHODS, f"shared module {m}.py imports a method script: {graph[m] & METHODS}"
    # depth-first search for a cycle
    state = {}

    def visit(m, path):
        state[m] = "open"
        for n in graph[m]:
            assert state.get(n) != "open", f"import cycle: {' -> '.join(path + [m, n])}"
            if n not in state:
                visit(n, path + [m])
        state[m] = "done"
    for m in MODULES:
        if m not in state:
            visit(m, [])


def test_no_module_is_too_long_to_read():
    """A module a newcomer can take in at one sitting (issue 20: about 700 lines); split it where it grows past."""
    for m in MODULES:
        lines = len((ROOT / f"{m}.py").read_text().splitlines())
        assert lines <= 760, f"{m}.py has {lines} lines: split it (as models.py was split from common.py)"


def _strip(node):
    """Source of a function / class without docstrings and comments (ast.unparse drops comments)."""
    node = ast.parse(ast.unparse(node)).body[0]
    for n in ast.walk(node):
        body = getattr(n, "body", None)
        if isinstance(body, list) and body and isinstance(body[0], ast.Expr) and \
                isinstance(getattr(body[0], "value", None), ast.Constant) and isinstance(body[0].value.value, str):
            n.body = body[1:] or [ast.Pass()]
    return ast.unparse(node)


def copies():
    """(file, name, source module, source name, renames) for every `# Copied from module.name [with a->b, ...]`."""
    out = []
    for path in ROOT.glob("*.py"):
        lines = path.read_text().splitlines()
        for i, line in enumerate(lines):
            m = re.match(r"# Copied from (\w+)\.(\w+)(?: with (.+))?$", line.strip())
            if m:
                name = re.match(r"(?:def|class) (\w+)", lines[i + 1]).group(1)
                renames = [tuple(r.split("->")) for r in m.group(3).split(",")] if m.group(3) else []
                out.append((path.stem, name, m.group(1), m.group(2), renames))
    return out


def test_there_are_copies_to_check():
    assert {(c[0], c[1]) for c in copies()} >= {("proposed", "select"), ("proposed", "replace_patches"),
                                                  ("proposed", "SourceBatches")}


@pytest.mark.parametrize("file,name,src,src_name,renames", copies())
def test_copied_code_has_not_drifted(file, name, src, src_name, renames):
    def node(module, n):
        tree = ast.parse((ROOT / f"{module}.py").read_text())
        return next(x for x in tree.body if getattr(x, "name", None) == n)
    original = _strip(node(src, src_name))
    for a, b in renames:
        original = re.sub(rf"\b{a.strip()}\b", b.strip(), original)
    assert _strip(node(file, name)) == original, (f"{file}.{name} is marked '# Copied from {src}.{src_name}' but "
                                                  f"differs from it: copy the change over, or drop the marker")


def test_copy_check_catches_a_drift(tmp_path):
    a = ast.parse("def f(x):\n    '''doc'''\n    return x + 1  # c\n").body[0]
    b = ast.parse("def f(x):\n    return x + 2\n").body[0]
    assert _strip(a) != _strip(b) and _strip(a) == _strip(ast.parse("def f(x):\n    return x + 1\n").body[0])
