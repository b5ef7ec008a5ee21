"""The shape of deme/ measured (issue: one place for each idea): no import cycles among its modules, every
in-package import at the top of its file, no module over 600 lines, no function over 80 lines. An AST scan of
the source; nothing is imported."""

import ast
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "deme"
MAX_MODULE_LINES, MAX_FUNCTION_LINES = 600, 80


def _modules() -> dict[str, ast.Module]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE.parent).with_suffix("")
        parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
        out[".".join(parts)] = ast.parse(path.read_text(), filename=str(path))
    return out


def _resolve(module: str, node: ast.ImportFrom, is_package: bool) -> str:
    """The absolute name a relative ``from .x import y`` refers to, inside ``module``."""
    if not node.level:
        return node.module or ""
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _in_package_imports(module: str, tree: ast.Module, names: set[str], nodes) -> set[str]:
    is_package = any(m.startswith(module + ".") for m in names)
    deps = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            deps |= {a.name for a in node.names if a.name in names}
        elif isinstance(node, ast.ImportFrom):
            target = _resolve(module, node, is_package)
            subs = {f"{target}.{a.name}" for a in node.names} & names   # from . import sd → deme.sd
            deps |= subs or ({target} & names)
    return deps - {module}


def _top_level_nodes(tree: ast.Module):
    for node in tree.body:
        if isinstance(node, ast.If):               # `if TYPE_CHECKING:` blocks count as top level
            yield from node.body
        yield node


def test_no_import_cycles_among_the_modules():
    mods = _modules()
    graph = {m: _in_package_imports(m, t, set(mods), _top_level_nodes(t)) for m, t in mods.items()}
    # a package's __init__ importing its own submodules is not a cycle of ideas
    graph = {m: {d for d in deps if not d.startswith(m + ".")} for m, deps in graph.items()}
    state, cycles = {}, []

    def visit(m, stack):
        state[m] = "open"
        for d in sorted(graph[m]):
            if state.get(d) == "open":
                cycles.append(stack[stack.index(d):] + [d])
            elif d not in state:
                visit(d, stack + [d])
        state[m] = "done"

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    assert not cycles, f"import cycles: {[' -> '.join(c) for c in cycles]}"
    assert graph["deme.stages"] and "deme.config" in graph["deme.train"]   # the scan sees real edges


# Imports inside functions are kept only for heavy optional dependencies that many users of a module never touch
# (matplotlib, PIL, diffusers' pipelines, transformers, open_clip, clean-fid, datasets, accelerate, scipy, sklearn,
# torchvision); the standard library and the core every module loads (torch, numpy, pandas) sit at the top.
ALWAYS_LOADED = set(sys.stdlib_module_names) | {"torch", "numpy", "pandas"}


# The command line is the one module that imports inside functions: each command imports its own module when
# it runs, so that `python -m deme reproduce` (which only starts notebook kernels) does not import diffusers and
# the training code first (~4 s instead of ~13 s, paid by every reproduction, rehearsal and CLI test).
LAZY_COMMAND_MODULES = {"deme.cli"}


def test_in_package_imports_sit_at_the_top_of_each_file():
    mods = _modules()
    hidden, needless = [], []
    for m, tree in mods.items():
        top = set(map(id, _top_level_nodes(tree)))
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)) and id(node) not in top:
                if m not in LAZY_COMMAND_MODULES and (_in_package_imports(m, tree, set(mods), [node]) or (
                        isinstance(node, ast.ImportFrom) and node.level)):
                    hidden.append(f"{m}:{node.lineno}")
                name = node.module if isinstance(node, ast.ImportFrom) else node.names[0].name
                if name and name.split(".")[0] in ALWAYS_LOADED:
                    needless.append(f"{m}:{node.lineno} {name}")
    assert not hidden, f"in-package imports inside functions hide dependencies: {hidden}"
    assert not needless, f"imports inside functions that save nothing (stdlib or torch/numpy/pandas): {needless}"


def test_modules_and_functions_stay_readable_in_a_sitting():
    long_modules, long_functions = [], []
    for path in sorted(PACKAGE.rglob("*.py")):
        n = len(path.read_text().splitlines())
        if n > MAX_MODULE_LINES:
            long_modules.append(f"{path.name}: {n}")
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                start = min([d.lineno for d in node.decorator_list] + [node.lineno])
                if node.end_lineno - start + 1 > MAX_FUNCTION_LINES:
                    long_functions.append(f"{path.name}:{node.name} ({node.end_lineno - start + 1})")
    assert not long_modules, f"modules over {MAX_MODULE_LINES} lines: {long_modules}"
    assert not long_functions, f"functions over {MAX_FUNCTION_LINES} lines: {long_functions}"
