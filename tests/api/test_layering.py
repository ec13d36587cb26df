"""DESIGN style point 1: the API layer imports no torch; only deltakernels/ imports triton; the registry knows no HTTP."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def imported_after(statement: str) -> set[str]:
    code = f"import sys; {statement}; print(' '.join(sorted({{m.split('.')[0] for m in sys.modules}})))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True).stdout
    return set(out.split())


def test_api_imports_no_torch():
    mods = imported_after("import serving.api.app, serving.client")
    assert not mods & {"torch", "triton", "transformers"}


def test_only_kernels_import_triton_and_registry_knows_no_http():
    for path in ROOT.glob("*/**/*.py"):
        rel = path.relative_to(ROOT)
        if rel.parts[0] in (".venv", "tests", "bench", "build", "mutants") or "site-packages" in rel.parts:
            continue
        text = path.read_text()
        if rel.parts[0] != "deltakernels":
            assert "import triton" not in text, rel
        if rel.parts[0] == "registry":
            assert "fastapi" not in text and "starlette" not in text and "httpx" not in text, rel


# The import graph between our packages (module-level and lazy imports alike): layers point one way.
LAYERS = {"serving": {"registry", "deltakernels", "formats"}, "registry": {"formats"}, "deltakernels": {"formats"}, "formats": set(),
          "loadtest": set()}  # fmt: skip

def test_layers_point_one_way():
    import ast

    found = set()
    for package in LAYERS:
        for path in (ROOT / package).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if isinstance(node, ast.Import):
                    targets = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    targets = [node.module]
                else:
                    continue
                for target in targets:
                    top = target.split(".")[0]
                    if top in LAYERS and top != package and top not in LAYERS[package]:
                        found.add((str(path.relative_to(ROOT)), top))
    assert found == set(), "imports against the layering"
