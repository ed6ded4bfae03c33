"""The rooms stay the size a newcomer can hold (issue 20): no module of the services, lls/ or
the lab harness over MAX_LINES, no function over MAX_FUNCTION, and no service importing
another's internals (they meet on the bus; proto/ and lls/ are shared)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("services", "lls", "lab")
MAX_LINES = 600
MAX_FUNCTION = 100


def modules() -> list[Path]:
    return sorted(p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py"))


def test_no_module_is_over_600_lines() -> None:
    long = {
        str(p.relative_to(ROOT)): n
        for p in modules()
        if (n := len(p.read_text().splitlines())) > MAX_LINES
    }
    assert long == {}


def test_no_function_is_over_100_lines() -> None:
    long = {}
    for p in modules():
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = (node.end_lineno or node.lineno) - node.lineno + 1
                if n > MAX_FUNCTION:
                    long[f"{p.relative_to(ROOT)}:{node.name}"] = n
    assert long == {}


def test_no_service_imports_another_services_modules() -> None:
    crossing = []
    for p in sorted((ROOT / "services").rglob("*.py")):
        own = p.relative_to(ROOT / "services").parts[0]
        for node in ast.walk(ast.parse(p.read_text())):
            names = []
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            for name in names:
                parts = name.split(".")
                if parts[0] == "services" and len(parts) > 1 and parts[1] != own:
                    crossing.append(f"{p.relative_to(ROOT)} imports {name}")
    assert crossing == []


def test_the_architecture_doc_names_every_module() -> None:
    """docs/architecture.md's "Where things live" lists every module (a new one gets its line)."""
    doc = (ROOT / "docs" / "architecture.md").read_text()
    rooms = doc[doc.index("## Where things live") : doc.index("## Bus")]
    missing = [
        str(p.relative_to(ROOT))
        for pkg in ("services", "lls", "lab", "proto")
        for p in sorted((ROOT / pkg).glob("**/*.py"))
        if p.name not in ("__init__.py", "__main__.py") and f"`{p.name}`" not in rooms
    ]
    assert missing == []
