"""Names that users choose: tenants and adapters (and the shape every such name must have).

A name is 1 to 64 characters of ASCII letters, digits, '.', '_' and '-', starts with a letter or a digit
and never contains "..". So a name is never ".", "..", a hidden file, a path, empty, or anything that
needs escaping in a URL path, a log line or a shell. Names are compared exactly (case-sensitive). They
are never used as file names by the registry (blobs are named by their content hash), the rule is
defence in depth and keeps names printable.
"""

from __future__ import annotations

import re

from registry.errors import InvalidName

MAX_NAME_LENGTH = 64
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
# The whole rule (but the length) as one regular expression without look-arounds, for JSON schemas: every "." is
# followed by a character that is not one, or ends the name.
NAME_PATTERN = r"^[A-Za-z0-9]([A-Za-z0-9_-]|\.[A-Za-z0-9_-])*\.?$"


def validate_name(kind: str, name: str) -> str:
    """Returns `name` unchanged if it is a valid `kind` name ("tenant", "adapter"), else raises
    InvalidName(message, param="name") saying what is wrong (the name is quoted with repr, shortened)."""
    if not isinstance(name, str):
        raise InvalidName(f"{kind} name must be a string, got {type(name).__name__}", "name")
    shown = repr(name if len(name) <= 80 else name[:80] + "...")
    rule = f"1 to {MAX_NAME_LENGTH} characters of A-Z a-z 0-9 . _ -, starting with a letter or digit"
    if not name:
        raise InvalidName(f"{kind} name must not be empty ({rule})", "name")
    if len(name) > MAX_NAME_LENGTH:
        raise InvalidName(f"{kind} name {shown} is {len(name)} characters long, over {MAX_NAME_LENGTH}", "name")
    if not _NAME_RE.fullmatch(name):
        raise InvalidName(f"invalid {kind} name {shown}: use {rule}", "name")
    if ".." in name:
        raise InvalidName(f"invalid {kind} name {shown}: it may not contain '..'", "name")
    return name
