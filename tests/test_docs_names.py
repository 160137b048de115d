"""Docstrings and docs name only what exists (issue 23): every repository path (`analysis/cache/files.py`,
`dashboard/views/*.py`) and every dotted name of the product (`analysis.present.overlay.view_tile`) that a
docstring of analysis/, dashboard/, data/, bench/ or scripts/ mentions resolves; every relative link of the
README and docs/ points to a file that is there; the README links every docs page and stays under 300 lines."""
from __future__ import annotations

import ast
import importlib
import re
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("analysis", "dashboard", "data")
SOURCES = PACKAGES + ("bench", "scripts")
PATH = re.compile(r"(?<![\w./-])((?:analysis|dashboard|data|tests|bench|scripts|docs)/[\w./*-]*\w)")
DOTTED = re.compile(r"(?<![\w./-])((?:analysis|dashboard|data)(?:\.\w+)+)")


def _docstrings(path: Path) -> list[tuple[int, str]]:
    """(line, text) of the module's, every class's and every function's docstring."""
    tree = ast.parse(path.read_text(), filename=str(path))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            text = ast.get_docstring(node, clean=False)
            if text:
                found.append((getattr(node, "lineno", 1), text))
    return found


def _path_exists(name: str) -> bool:
    name = name.rstrip(".")
    if "*" in name:
        return any(REPO_ROOT.glob(name))
    return (REPO_ROOT / name).exists()


def _dotted_exists(name: str) -> bool:
    """A module, or an attribute reached from the longest importable module prefix."""
    parts = name.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            value = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        for attribute in parts[cut:]:
            if not hasattr(value, attribute):
                return False
            value = getattr(value, attribute)
        return True
    return False


def _mentions() -> list[tuple[str, int, str, str]]:
    found = []
    for folder in SOURCES:
        for path in sorted((REPO_ROOT / folder).rglob("*.py")):
            for line, text in _docstrings(path):
                where = str(path.relative_to(REPO_ROOT))
                found += [(where, line, "path", m) for m in PATH.findall(text)]
                found += [(where, line, "name", m) for m in DOTTED.findall(text)
                          if not m.endswith((".py", ".md", ".png", ".json", ".sqlite", ".csv", ".html"))]
    return found


def test_the_patterns_find_what_they_should() -> None:
    text = "see analysis/cache/files.py and analysis.present.overlay.view_tile, not x/analysis/y.py or a.analysis.b"
    assert PATH.findall(text) == ["analysis/cache/files.py"]
    assert DOTTED.findall(text) == ["analysis.present.overlay.view_tile"]
    assert _dotted_exists("analysis.cache.files") and not _dotted_exists("analysis.cache.no_such_thing")
    assert _path_exists("dashboard/views/*.py") and not _path_exists("analysis/cluster_offline.py")


def test_every_path_and_name_a_docstring_mentions_exists() -> None:
    mentions = _mentions()
    assert len(mentions) > 50  # the walk reads the docstrings at all
    missing = [f"{where}:{line}: {kind} {name}" for where, line, kind, name in mentions
               if not (_path_exists(name) if kind == "path" else _dotted_exists(name))]
    assert not missing, "docstrings name what is gone:\n" + "\n".join(missing)


def _markdown_files() -> list[Path]:
    return [REPO_ROOT / "README.md", *sorted((REPO_ROOT / "docs").glob("*.md"))]


@pytest.mark.parametrize("page", _markdown_files(), ids=lambda p: p.name)
def test_every_relative_link_of_the_docs_resolves(page: Path) -> None:
    links = re.findall(r"\]\(([^)\s]+)\)", page.read_text())
    broken = [link for link in links if not link.startswith(("http://", "https://", "#", "mailto:"))
              and not (page.parent / link.split("#")[0]).exists()]
    assert not broken, f"{page.name} links to what is not there: {broken}"


def test_the_readme_is_short_and_links_every_docs_page() -> None:
    readme = (REPO_ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 300
    unlinked = [p.name for p in (REPO_ROOT / "docs").glob("*.md") if f"docs/{p.name}" not in readme]
    assert not unlinked, f"README does not link {unlinked}"
