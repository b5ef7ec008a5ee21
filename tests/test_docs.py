"""Every reference to a repository file resolves: the paths that code, tests, docs, notebooks and settings name
(``docs/….md``, ``figures/…``, ``data/…``, ``notebooks/….ipynb``, ``deme/…``, a bare ``NAME.md`` such as
the README) exist in the checkout, and a "docs/method.md §N" points to a section the method notes have.
Templates (``figures/<name>_fmnist.csv``, ``notebooks/*.ipynb``, f-string paths) and paths under other roots
(``runs/``: git-ignored output, ``/usr/…``, URLs) are not references to check."""

import json
import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SUFFIXES = (".py", ".md", ".ipynb", ".toml", ".yml", ".yaml")
TOP_DIRS = ("docs", "figures", "data", "notebooks", "deme", "tests", "benchmarks", "scripts")

# A path that starts at one of the repository's top folders, or a bare upper-case Markdown name (README.md);
# not inside another path (runs/smoke/figures/…, /usr/share/…, https://…/docs/…).
REFERENCE = re.compile(r"(?<![\w./~@-])(?:(?:%s)/[\w./-]*|[A-Z][A-Z0-9_]*\.md\b)" % "|".join(TOP_DIRS))
TEMPLATE_NEXT = set("<{*$…[")            # figures/<name>_fmnist.csv, figures/{name}.csv, notebooks/*.ipynb
SECTION_REF = re.compile(r"docs/method\.md §(\d+(?:\.\d+)?)")
SECTION_HEADING = re.compile(r"^#{2,3} (\d+(?:\.\d+)?)\.? ", re.M)

# (file, reference) pairs that are not missing files, each with its reason.
ALLOWED = {
    ("tests/test_colab.py", "notebooks/x.ipynb"): "a made-up notebook name the badge builder is tested with",
}


def tracked_text_files(root: Path = ROOT) -> list[str]:
    """The tracked files with a text suffix that may name repository files (this file aside: its references
    are examples, planted on purpose)."""
    out = subprocess.run(["git", "ls-files"], cwd=root, capture_output=True, text=True, check=True).stdout
    return [f for f in out.splitlines() if f.endswith(SUFFIXES) and f != "tests/test_docs.py"]


def readable_text(path: Path) -> str:
    """A file's text; for a notebook, its cells' sources (outputs are what a run printed, not references)."""
    text = path.read_text(encoding="utf-8")
    if path.suffix != ".ipynb":
        return text
    return "\n".join("".join(c["source"]) for c in json.loads(text)["cells"])


def references(text: str) -> list[str]:
    """The repository paths ``text`` names, templates left out, trailing punctuation stripped."""
    refs = []
    for m in REFERENCE.finditer(text):
        if text[m.end():m.end() + 1] in TEMPLATE_NEXT:
            continue
        ref = m.group(0).rstrip(".,;:-")
        if ref.rstrip("/") not in TOP_DIRS:
            refs.append(ref)
    return refs


def missing_references(root: Path = ROOT, files: list[str] | None = None) -> list[str]:
    """``file: reference`` for every reference in ``files`` (default: :func:`tracked_text_files`) that names
    no file or folder of ``root``; a bare ``NAME.md`` may be any tracked file of that name."""
    tracked = tracked_text_files(root) if files is None else files
    names = {Path(f).name for f in subprocess.run(["git", "ls-files"], cwd=root, capture_output=True, text=True,
                                                  check=True).stdout.splitlines()}
    bad = []
    for f in tracked:
        for ref in references(readable_text(root / f)):
            found = (ref in names) if "/" not in ref else (root / ref).exists()
            if not found and (f, ref) not in ALLOWED:
                bad.append(f"{f}: {ref}")
    return bad


def missing_sections(root: Path = ROOT, files: list[str] | None = None) -> list[str]:
    """``file: §N`` for every "docs/method.md §N" whose section heading docs/method.md lacks."""
    method = root / "docs" / "method.md"
    sections = set(SECTION_HEADING.findall(method.read_text(encoding="utf-8"))) if method.exists() else set()
    return [f"{f}: §{s}" for f in (tracked_text_files(root) if files is None else files)
            for s in SECTION_REF.findall(readable_text(root / f)) if s not in sections]


def test_every_referenced_repository_file_exists():
    assert not missing_references(), "references to missing files"


def test_every_method_section_referenced_exists():
    assert len(SECTION_HEADING.findall((ROOT / "docs" / "method.md").read_text())) >= 10
    assert not missing_sections(), "references to missing sections of docs/method.md"


def test_references_are_found_and_templates_are_not():
    text = ("see docs/paper_scale.md, figures/gallery_fmnist.png and (data/fmnist_base/). "
            "Templates: figures/<name>_fmnist.csv, figures/{name}.csv, notebooks/*.ipynb, figures/…; other roots: "
            "runs/smoke/figures/x.csv, /usr/share/datasets/fashion-mnist, https://x.org/docs/a.md; "
            "names: README.md, the method notes (docs/method.md §2.1).")
    assert references(text) == ["docs/paper_scale.md", "figures/gallery_fmnist.png", "data/fmnist_base/",
                                "README.md", "docs/method.md"]


@pytest.mark.parametrize("planted", ["docs/" + "no_such_notes.md", "figures/" + "fig9_missing_fmnist.png",
                                     "NO_SUCH_" + "NOTES.md", "docs/method.md §" + "12"])
def test_a_planted_bad_reference_is_caught(tmp_path, planted):
    """A copy of the repository's tracked docs in a fresh git checkout, one file given a reference to something
    that does not exist: the scan names exactly that file and reference."""
    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    for f in ("README.md", "docs/method.md", "docs/paper_scale.md"):
        (tmp_path / f).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / f).write_text((ROOT / f).read_text(encoding="utf-8"), encoding="utf-8")
    (tmp_path / "docs" / "new.md").write_text(f"# New\n\nAs {planted} says.\n", encoding="utf-8")
    subprocess.run(["git", "add", "-A"], cwd=tmp_path, check=True)
    found = missing_references(tmp_path) + missing_sections(tmp_path)
    expected = "docs/new.md: §12" if "§" in planted else f"docs/new.md: {planted}"
    assert [x for x in found if x.startswith("docs/new.md")] == [expected]
    (tmp_path / "docs" / "new.md").write_text("# New\n\nAs docs/method.md §2.1 says.\n", encoding="utf-8")
    assert not [x for x in missing_references(tmp_path) + missing_sections(tmp_path) if x.startswith("docs/new")]
