"""The layering docs/architecture.md describes, checked on the source: module-level imports between
gptkit's modules form no cycle, no script imports another script, a function-local import says why,
and the tokenizer is never process-wide state."""

import ast
import glob
import os
import re

from conftest import ROOT

LIBRARY = ["model"] + sorted(os.path.splitext(os.path.relpath(p, ROOT))[0].replace(os.sep, ".")
                             for p in glob.glob(os.path.join(ROOT, "gptkit", "*.py")))
SCRIPTS = sorted(os.path.splitext(os.path.basename(p))[0] for p in glob.glob(os.path.join(ROOT, "*.py"))
                 if os.path.basename(p) != "model.py")


def source_path(module):
    return os.path.join(ROOT, *module.split(".")) + ".py"


def imported_modules(node):
    """The module names an import statement brings in (gptkit.x for `from gptkit import x`)."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    if node.module == "gptkit":
        return [f"gptkit.{alias.name}" for alias in node.names]
    return [node.module] if node.module else []


def own_imports(module, top_level_only=True):
    """[(imported gptkit module or script, line)] of module: its top-level statements, or every import."""
    tree = ast.parse(open(source_path(module), encoding="utf-8").read())
    nodes = tree.body if top_level_only else ast.walk(tree)
    ours = set(LIBRARY) | set(SCRIPTS)
    return [(name, node.lineno) for node in nodes if isinstance(node, (ast.Import, ast.ImportFrom))
            for name in imported_modules(node) if name in ours]


def find_cycle(graph):
    """A list of modules that import each other in a circle, or None."""
    state = {}

    def visit(node, path):
        state[node] = "open"
        for nxt in graph.get(node, ()):
            if state.get(nxt) == "open":
                return path[path.index(nxt):] + [nxt]
            if nxt not in state:
                cycle = visit(nxt, path + [nxt])
                if cycle:
                    return cycle
        state[node] = "done"
        return None

    for start in graph:
        if start not in state:
            cycle = visit(start, [start])
            if cycle:
                return cycle
    return None


def test_find_cycle_finds_one():  # the checker itself can fail
    assert find_cycle({"a": ["b"], "b": ["c"], "c": ["a"]}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": ["b"], "b": ["c"], "c": []}) is None


def test_the_library_has_no_import_cycle():
    graph = {module: sorted({name for name, _ in own_imports(module, top_level_only=False)}) for module in LIBRARY}
    assert find_cycle(graph) is None, f"import cycle: {' -> '.join(find_cycle(graph))}"


def test_the_library_never_imports_a_script():
    for module in LIBRARY:
        scripts = [name for name, _ in own_imports(module, top_level_only=False) if name in SCRIPTS]
        assert not scripts, f"{module} imports the script(s) {scripts}: shared code belongs in gptkit/"


def test_no_script_imports_another_script():
    for script in SCRIPTS:
        others = [f"{name} (line {line})" for name, line in own_imports(script, top_level_only=False)
                  if name in SCRIPTS]
        assert not others, f"{script}.py imports {others}: move what they share into gptkit/"


def test_a_function_local_import_says_why():
    """Imports sit at the top of a module; one inside a function carries a comment (on its line or the
    line above) giving the reason, such as an optional heavy dependency loaded on one path only."""
    unexplained = []
    for module in LIBRARY + SCRIPTS:
        lines = open(source_path(module), encoding="utf-8").read().splitlines()
        tree = ast.parse("\n".join(lines))
        top = {id(node) for node in tree.body}
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)) and id(node) not in top:
                here, above = lines[node.lineno - 1], lines[node.lineno - 2] if node.lineno > 1 else ""
                if "#" not in here and "#" not in above:  # `try:  # optional: ...` above counts
                    unexplained.append(f"{module}.py:{node.lineno}: {here.strip()}")
    assert not unexplained, "function-local imports without a reason:\n" + "\n".join(unexplained)


def test_no_process_wide_tokenizer():
    pattern = re.compile(r"\b(use_tokenizer|get_tokenizer)\b|\b_active\b")
    found = [f"{module}.py:{i}" for module in LIBRARY + SCRIPTS
             for i, line in enumerate(open(source_path(module), encoding="utf-8"), 1) if pattern.search(line)]
    assert not found, f"a process-wide tokenizer is read or set at {found}: pass the Tokenizer explicitly"


def documented_layers():
    """{module: layer} from the table in docs/architecture.md ("| 2 | `data` | ..."; model.py counts as model)."""
    layers = {}
    for line in open(os.path.join(ROOT, "docs", "architecture.md"), encoding="utf-8"):
        cells = [c.strip() for c in line.split("|")[1:-1]]
        if len(cells) == 3 and cells[0].isdigit():
            for name in re.findall(r"`([a-z_]+)(?:\.py)?`", cells[1]):
                layers["model" if name == "model" else f"gptkit.{name}"] = int(cells[0])
    return layers


def test_imports_follow_the_documented_layers():
    """A module imports its own layer or the ones below (the cycle test keeps a layer free of circles)."""
    layers = documented_layers()
    undocumented = [m for m in LIBRARY if m not in layers and m != "gptkit.__init__"]
    assert not undocumented, f"add {undocumented} to the layer table of docs/architecture.md"
    upward = [f"{module} (layer {layers[module]}) imports {name} (layer {layers[name]}) at line {line}"
              for module in layers for name, line in own_imports(module, top_level_only=False)
              if name in layers and layers[name] > layers[module]]
    assert not upward, "imports against the layers of docs/architecture.md:\n" + "\n".join(upward)
