"""The documentation a user's clone has: every `docs/…md` that the code, the README or the docs name exists, and
nothing points outside the repository (../shared is the developers' folder, not in a user's clone)."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SOURCES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")),
           *(p for d in ("serving", "registry", "deltakernels", "formats", "loadtest") for p in sorted((ROOT / d).rglob("*.py")))]  # fmt: skip


def test_every_named_doc_exists():
    named = {(src.relative_to(ROOT), m) for src in SOURCES for m in re.findall(r"\bdocs/[\w.-]+\.md", src.read_text())}
    assert len(named) >= 3  # the check looks where the names are
    missing = sorted(f"{src}: {m}" for src, m in named if not (ROOT / m).is_file())
    assert not missing, missing


def test_no_doc_points_to_the_developers_shared_folder():
    offenders = [str(src.relative_to(ROOT)) for src in SOURCES if "../shared" in src.read_text()]
    assert not offenders, offenders
