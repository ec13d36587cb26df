"""Command-line flags made from the typed settings (serving.engine.config, serving.server.ServerSettings), so a
flag's name, type, choices, default and help are written once, on the setting's field.

A field `max_num_seqs: int = Field(64, ge=1, description=...)` becomes `--max-num-seqs N`; a `Literal` gives the
choices, a bool a switch, a list a repeatable flag. Values are checked by the settings model when it is made
(`settings_error` words pydantic's refusal as the flag's). `python -m serving.flags` prints the server's
options as the Markdown table of docs/operations.md.
"""

from __future__ import annotations

import argparse
import types
import typing
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ValidationError
from pydantic.fields import FieldInfo


def flag_name(field: str) -> str:
    return "--" + field.replace("_", "-")


def _scalar(annotation: Any) -> Any:
    """The annotation without `| None`."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        (inner,) = [a for a in typing.get_args(annotation) if a is not type(None)]
        return inner
    return annotation


def add_flags(
    parser: argparse.ArgumentParser, model: type[BaseModel], names: Iterable[str], *, defaults: bool
) -> None:
    """Adds a flag for each named field of `model`. defaults=False leaves an unset flag None, so that the settings
    fall back on their environment variables and then on the field's default (`deltaserve serve`); True puts
    the field's default in (`deltaserve generate`, which reads no environment)."""
    for name in names:
        info: FieldInfo = model.model_fields[name]
        kind = _scalar(info.annotation)
        default = info.get_default(call_default_factory=True) if defaults else None
        kwargs: dict[str, Any] = {"default": default, "help": _help(info)}
        extra = info.json_schema_extra if isinstance(info.json_schema_extra, dict) else {}
        if "metavar" in extra or kind is Path:
            kwargs["metavar"] = extra.get("metavar", "DIR")
        if kind is bool:
            kwargs["action"] = "store_true"
        elif typing.get_origin(kind) is Literal:
            kwargs["choices"] = list(typing.get_args(kind))
        elif typing.get_origin(kind) is list:
            kwargs.update(action="append", type=typing.get_args(kind)[0])
        else:
            kwargs["type"] = kind
        parser.add_argument(flag_name(name), dest=name, **kwargs)


def _help(info: FieldInfo) -> str | None:
    if info.description is None:
        return None
    default = info.get_default(call_default_factory=True)
    if default in (None, [], False):
        return info.description
    return f"{info.description} (default {default})"


def given_flags(args: argparse.Namespace, model: type[BaseModel]) -> dict[str, Any]:
    """The flags the user set (not None), by field name, to make `model` from."""
    return {name: getattr(args, name) for name in model.model_fields if getattr(args, name, None) is not None}


def settings_error(e: ValidationError) -> str:
    """pydantic's first refusal, worded for the command line: "--max-num-seqs: Input should be ... 1"."""
    err = e.errors()[0]
    field = str(err["loc"][0]) if err["loc"] else ""
    return f"{flag_name(field)}: {err['msg']}" if field else err["msg"]


def markdown_table(model: type[BaseModel], env_prefix: str) -> str:
    """The options of `model`: flag, environment variable, default, meaning (for docs/operations.md)."""
    rows = ["| flag | environment | default | meaning |", "|---|---|---|---|"]
    for name, info in model.model_fields.items():
        default = info.get_default(call_default_factory=True)
        shown = "—" if default in (None, []) else "off" if default is False else f"`{default}`"
        env = f"`{env_prefix}{name.upper()}`" + (" (a JSON list)" if isinstance(default, list) else "")
        rows.append(f"| `{flag_name(name)}` | {env} | {shown} | {info.description or ''} |")
    return "\n".join(rows)


def main() -> int:
    from serving.server import ServerSettings

    print(markdown_table(ServerSettings, ServerSettings.model_config.get("env_prefix", "")))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
