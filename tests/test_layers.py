"""The layer contract of issue 23, read from the source (every import, those inside functions included):

    fgcam, cache          the bottom: neither imports the other, nor anything above
    pipeline              the offline job and what it is made of
    present               drawing: overlays, image tiles, charts (numpy / PIL / altair over a cache)
    explore, review, trust, findings   the analyses over a finished cache (they may use each other, no circle)
    report                the HTML report (analysis/report.py): the analyses' results, drawn through present
    commands              the CLI: argparse and the command chains
    dashboard             the Streamlit app

Drawing is split in two layers on purpose: the tiles and charts sit below the analyses, because the analyses'
page data use them (the Clusters page's prototype tile, the Trust page's region tile); the report sits above the
analyses, because it reads what they stored (the clustering, the tags) and is given the findings.

No module imports a layer above its own, no import circle joins product modules, and no `_private` name is
imported from another module. The exceptions are named below with their reason."""
from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
CHECKED = ("analysis", "dashboard")

# Dotted prefix -> rank; a module's layer is its longest matching prefix. `analysis.__main__` is the CLI's entry.
LAYERS: dict[str, int] = {
    "analysis": 0,
    "analysis.fgcam": 0,
    "analysis.cache": 0,
    "analysis.pipeline": 1,
    "analysis.present": 2,
    "analysis.explore": 3,
    "analysis.review": 3,
    "analysis.trust": 3,
    "analysis.findings": 3,
    "analysis.report": 4,
    "analysis.report_compare": 4,
    "analysis.commands": 5,
    "analysis.__main__": 5,
    "dashboard": 6,
}
# Packages of one layer that must not import each other (the two bottom packages are independent).
INDEPENDENT = (("analysis.fgcam", "analysis.cache"),)

# (importer, imported) -> why it may stay. At most one permanent exception (issue 23's acceptance).
EXCEPTIONS: dict[tuple[str, str], str] = {}


@dataclass(frozen=True)
class Import:
    importer: str
    imported: str  # the module (or package) the statement loads
    names: tuple[str, ...]  # the names a `from` import takes from it
    line: int


def _modules(root: Path = REPO_ROOT) -> dict[str, tuple[Path, bool]]:
    """Dotted name -> (path, is a package's __init__) for every module of analysis/ and dashboard/."""
    found = {}
    for folder in CHECKED:
        for path in sorted((root / folder).rglob("*.py")):
            parts = list(path.relative_to(root).with_suffix("").parts)
            is_package = parts[-1] == "__init__"
            found[".".join(parts[:-1] if is_package else parts)] = (path, is_package)
    return found


def _imports(modules: dict[str, tuple[Path, bool]]) -> list[Import]:
    """Every import of a product module by a product module. `from package import module` reads as an import
    of the module; `from package import name` as an import of the package."""
    found = []
    for importer, (path, is_package) in modules.items():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                found += [Import(importer, alias.name, (), node.lineno) for alias in node.names
                          if alias.name.split(".")[0] in CHECKED]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    package = importer.split(".") if is_package else importer.split(".")[:-1]
                    package = package[:len(package) - (node.level - 1)]
                    base = ".".join(package + ([node.module] if node.module else []))
                if base.split(".")[0] not in CHECKED:
                    continue
                plain = tuple(alias.name for alias in node.names if f"{base}.{alias.name}" not in modules)
                found += [Import(importer, f"{base}.{alias.name}", (), node.lineno) for alias in node.names
                          if f"{base}.{alias.name}" in modules]
                if plain:
                    found.append(Import(importer, base, plain, node.lineno))
    return found


def _layer(module: str) -> tuple[str, int]:
    prefix = max((p for p in LAYERS if module == p or module.startswith(p + ".")), key=len)
    return prefix, LAYERS[prefix]


def _edges(modules: dict[str, tuple[Path, bool]], imports: list[Import]) -> dict[str, set[str]]:
    """Module -> the modules its imports run: the imported module and the packages above it that the importer
    is not already inside (their __init__ runs first)."""
    edges: dict[str, set[str]] = {name: set() for name in modules}
    for item in imports:
        parts = item.imported.split(".")
        for end in range(1, len(parts) + 1):
            target = ".".join(parts[:end])
            inside = item.importer == target or item.importer.startswith(target + ".")
            if target in modules and not inside:
                edges[item.importer].add(target)
    return edges


def _circles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(edges[node]):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1 or node in edges[node]:
                found.append(sorted(component))

    for node in sorted(edges):
        if node not in index:
            visit(node)
    return found


def _upward(imports: list[Import]) -> list[tuple[str, str, int]]:
    found = []
    for item in imports:
        (importer_layer, importer_rank), (imported_layer, imported_rank) = _layer(item.importer), _layer(item.imported)
        independent = any({importer_layer, imported_layer} == set(pair) for pair in INDEPENDENT)
        if imported_rank > importer_rank or independent:
            found.append((item.importer, item.imported, item.line))
    return found


def test_no_module_imports_a_layer_above_its_own():
    allowed = set(EXCEPTIONS)
    upward = [edge for edge in _upward(_imports(_modules())) if edge[:2] not in allowed]
    assert not upward, f"imports that run up the layers (importer, imported, line): {upward}"


def test_no_import_circle_joins_product_modules():
    modules = _modules()
    circles = _circles(_edges(modules, _imports(modules)))
    assert not circles, f"import circles (the modules of each): {circles}"


def _private_imports(imports: list[Import]) -> list[tuple[str, str, str]]:
    return [(item.importer, item.imported, name) for item in imports
            for name in item.names if name.startswith("_") and not name.startswith("__")]


def test_no_private_name_is_imported_from_another_module():
    crossing = _private_imports(_imports(_modules()))
    assert not crossing, f"private names imported across modules (importer, module, name): {crossing}"


def test_every_exception_is_still_needed():
    """An exception whose import is gone must go too, so the lists only shrink; one permanent at most."""
    assert len(EXCEPTIONS) <= 1
    imports = _imports(_modules())
    upward = {edge[:2] for edge in _upward(imports)}
    assert not sorted(set(EXCEPTIONS) - upward)


def test_the_checker_sees_an_upward_import_a_circle_and_a_private_name(tmp_path):
    """The checker itself, on a made-up tree: cache importing pipeline, a two-module circle inside explore, and
    a private name taken from a sibling are each caught; a relative import resolves to its package."""
    files = {
        "analysis/__init__.py": "",
        "analysis/cache/__init__.py": "",
        "analysis/cache/reader.py": "def f():\n    from analysis.pipeline import job\n",
        "analysis/cache/layout.py": "",
        "analysis/pipeline/__init__.py": "",
        "analysis/pipeline/job.py": "from ..cache import layout\n",
        "analysis/explore/__init__.py": "",
        "analysis/explore/a.py": "from .b import _hidden\n",
        "analysis/explore/b.py": "import analysis.explore.a\n_hidden = 1\n",
        "dashboard/__init__.py": "",
    }
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    modules = _modules(tmp_path)
    imports = _imports(modules)
    assert [edge[:2] for edge in _upward(imports)] == [("analysis.cache.reader", "analysis.pipeline.job")]
    assert Import("analysis.pipeline.job", "analysis.cache.layout", (), 1) in imports
    assert _circles(_edges(modules, imports)) == [["analysis.explore.a", "analysis.explore.b"]]
    assert _private_imports(imports) == [("analysis.explore.a", "analysis.explore.b", "_hidden")]
