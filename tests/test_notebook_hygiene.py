"""The committed notebooks are what readers see on GitHub and in Colab: no stored errors or warnings, no machine
paths, markdown without stray carriage returns, every table cell showing its table, a tagged parameters cell."""

import ast
import json
import re
from pathlib import Path

import pytest

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))


def _text(output) -> str:
    if "text" in output:
        return "".join(output["text"])
    return "".join("".join(v) if isinstance(v, list) else str(v) for v in output.get("data", {}).values())


def _shows_a_value(source: str) -> bool:
    """Whether a cell ends with an expression Jupyter displays (not print/show/display, not None)."""
    try:
        body = ast.parse(source).body
    except SyntaxError:
        return False
    if not body or not isinstance(body[-1], ast.Expr):
        return False
    value = body[-1].value
    if isinstance(value, ast.Call) and getattr(value.func, "id", getattr(value.func, "attr", "")) in (
            "print", "show", "display"):
        return False
    return not isinstance(value, ast.IfExp)   # "x if cond else None" may legitimately show nothing


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_committed_notebook_is_clean(path):
    nb = json.loads(path.read_text())
    assert nb["metadata"].get("kernelspec"), "papermill needs a kernelspec"
    assert any("parameters" in c["metadata"].get("tags", []) for c in nb["cells"]), "no tagged parameters cell"
    assert not {"input_path", "output_path"} & set(nb["metadata"].get("papermill", {})), "machine paths in metadata"
    for i, cell in enumerate(nb["cells"]):
        source = "".join(cell["source"])
        if cell["cell_type"] == "markdown":
            assert "\r" not in source, f"cell {i}: carriage return in markdown"
            continue
        for out in cell.get("outputs", []):
            assert out["output_type"] != "error", f"cell {i}: stored error {out.get('ename')}"
            text = _text(out)
            for bad in ("/tmp/", "site-packages", "ERROR:root", "Traceback", "Warning:"):
                assert bad not in text, f"cell {i}: output contains {bad!r}"
            assert not re.search(r"/[\w.-]+/(runs|data|figures|notebooks)/", text), f"cell {i}: an absolute path"
            if out["output_type"] == "stream":
                assert out["name"] != "stderr" or not text.strip(), f"cell {i}: stderr output: {text[:200]!r}"
            assert "application/vnd.jupyter.widget-view+json" not in out.get("data", {}), \
                f"cell {i}: a progress widget (renders as a stray '0%|' line on GitHub and in Colab)"
        if cell["cell_type"] == "code" and cell.get("execution_count") and _shows_a_value(source):
            assert cell.get("outputs"), f"cell {i} ends with a value to show but has no output"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_papermill_reads_every_parameter(path):
    """Every assignment of the ``parameters`` cell is a parameter papermill knows: a line it cannot parse (an
    ``=`` inside the comment did this to notebook 06's ``table3``) makes ``-p name value`` warn "unknown
    parameter" and leaves the name out of ``papermill --help-notebook``."""
    import papermill as pm
    cell = next(c for c in json.loads(path.read_text())["cells"] if "parameters" in c["metadata"].get("tags", []))
    assigned = [t.id for node in ast.parse("".join(cell["source"])).body if isinstance(node, ast.Assign)
                for t in node.targets if isinstance(t, ast.Name)]
    assert assigned and list(pm.inspect_notebook(str(path))) == assigned
