"""The size rule of issue 12: no module of analysis/, dashboard/ or data/ (issue 23) over 500 lines and no
function over 60 lines, unless a reason is written: for a function, a comment `# long: <why>` among the first lines
of its body, or an entry in LONG_FUNCTIONS below; for a module, an entry in LONG_MODULES. An entry that is no
longer needed fails too, so the lists only shrink."""
from __future__ import annotations

import ast
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
CHECKED = ("analysis", "dashboard", "data")
MAX_MODULE_LINES = 500
MAX_FUNCTION_LINES = 60

# "path:qualified name" -> why it is long. Empty: issue 23 split the last six.
LONG_FUNCTIONS: dict[str, str] = {}
# path -> why it is long.
LONG_MODULES: dict[str, str] = {}


def _python_files() -> list[Path]:
    return sorted(path for folder in CHECKED for path in (REPO_ROOT / folder).rglob("*.py"))


def _functions(tree: ast.AST, prefix: str = "") -> list[tuple[str, ast.FunctionDef | ast.AsyncFunctionDef]]:
    """(qualified name, node) of every function and method, nested ones included."""
    found = []
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            found.append((prefix + node.name, node))
            found += _functions(node, f"{prefix}{node.name}.")
        elif isinstance(node, ast.ClassDef):
            found += _functions(node, f"{prefix}{node.name}.")
    return found


def _has_reason(lines: list[str], node: ast.FunctionDef | ast.AsyncFunctionDef) -> bool:
    """A `# long: <why>` comment between the signature and the first statement after the docstring."""
    body = node.body
    first = body[1] if len(body) > 1 and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) \
        else body[0]
    top = lines[node.lineno:first.lineno + 1]
    return any(line.strip().startswith("# long:") and len(line.strip()) > len("# long:") + 3 for line in top)


def _long_functions() -> dict[str, int]:
    long = {}
    for path in _python_files():
        text = path.read_text(encoding="utf-8")
        lines = text.splitlines()
        for name, node in _functions(ast.parse(text)):
            length = node.end_lineno - node.lineno + 1
            if length > MAX_FUNCTION_LINES and not _has_reason(lines, node):
                long[f"{path.relative_to(REPO_ROOT).as_posix()}:{name}"] = length
    return long


def test_no_function_is_over_60_lines_without_a_reason():
    long = _long_functions()
    unexplained = {name: length for name, length in long.items() if name not in LONG_FUNCTIONS}
    assert not unexplained, ("functions over 60 lines: split them, or write `# long: <why>` at their top "
                             f"(name: lines): {unexplained}")


def test_every_exempt_function_is_still_long():
    stale = sorted(set(LONG_FUNCTIONS) - set(_long_functions()))
    assert not stale, f"remove these from LONG_FUNCTIONS (gone, or no longer over 60 lines): {stale}"


def test_no_module_is_over_500_lines_without_a_reason():
    sizes = {path.relative_to(REPO_ROOT).as_posix(): len(path.read_text(encoding="utf-8").splitlines())
             for path in _python_files()}
    long = {path: size for path, size in sizes.items() if size > MAX_MODULE_LINES}
    assert not {path: size for path, size in long.items() if path not in LONG_MODULES}, long
    assert not sorted(set(LONG_MODULES) - set(long)), "remove these from LONG_MODULES"


def test_the_rule_sees_a_long_function_and_its_reason(tmp_path):
    """The checker itself: a 61-line function is caught, and a `# long:` comment at its top excuses it."""
    body = "\n".join(f"    x{i} = {i}" for i in range(60))
    plain = f"def f():\n{body}\n"
    excused = f"def f():\n    \"\"\"Doc.\"\"\"\n    # long: a table of sixty numbers\n{body}\n"
    for text, expected in ((plain, False), (excused, True)):
        node = ast.parse(text).body[0]
        assert node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES
        assert _has_reason(text.splitlines(), node) is expected
