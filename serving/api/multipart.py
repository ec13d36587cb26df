"""Streaming multipart/form-data parsing: parts go to a sink chunk by chunk, never whole into memory."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Protocol

from python_multipart.multipart import MultipartParser, parse_options_header

from registry.errors import DeltaError, RegistryError
from serving.api.errors import APIError

MAX_FIELD_BYTES = 4096
MAX_PARTS = 64


class PartSink(Protocol):
    def begin_file(self, field: str, filename: str) -> None: ...
    def file_data(self, data: bytes) -> None: ...
    def end_file(self) -> None: ...
    def field(self, name: str, value: str) -> None: ...


async def parse_multipart(content_type: str, body: AsyncIterator[bytes], sink: PartSink) -> None:
    """Parses a multipart body as it arrives. Form fields (no filename) are small strings given to
    `sink.field`; file parts are streamed to `sink.begin_file/file_data/end_file`."""
    ctype, options = parse_options_header(content_type or "")
    if ctype != b"multipart/form-data" or b"boundary" not in options:
        raise APIError(415, "Uploads must be multipart/form-data.", param="content-type")
    state: dict = {"headers": {}, "field": b"", "value": b"", "name": None, "filename": None, "buf": bytearray(), "parts": 0}

    def on_part_begin():
        state["headers"], state["name"], state["filename"] = {}, None, None
        state["buf"] = bytearray()
        state["parts"] += 1
        if state["parts"] > MAX_PARTS:
            raise APIError(400, f"At most {MAX_PARTS} parts per upload.")

    def on_header_field(data, start, end):
        state["field"] += data[start:end]

    def on_header_value(data, start, end):
        state["value"] += data[start:end]

    def on_header_end():
        state["headers"][state["field"].lower()] = state["value"]
        state["field"], state["value"] = b"", b""

    def on_headers_finished():
        disposition, params = parse_options_header(state["headers"].get(b"content-disposition", b""))
        if disposition != b"form-data" or b"name" not in params:
            raise APIError(400, "Each multipart part needs a Content-Disposition: form-data header with a name.")
        state["name"] = params[b"name"].decode("utf-8", "replace")
        if b"filename" in params:
            state["filename"] = params[b"filename"].decode("utf-8", "replace")
            sink.begin_file(state["name"], state["filename"])

    def on_part_data(data, start, end):
        if state["filename"] is not None:
            sink.file_data(bytes(data[start:end]))
        else:
            state["buf"] += data[start:end]
            if len(state["buf"]) > MAX_FIELD_BYTES:
                raise APIError(400, f"Form field `{state['name']}` is over {MAX_FIELD_BYTES} bytes.", param=state["name"])

    def on_part_end():
        if state["filename"] is not None:
            sink.end_file()
        elif state["name"] is not None:
            try:
                sink.field(state["name"], state["buf"].decode("utf-8"))
            except UnicodeDecodeError:
                raise APIError(400, f"Form field `{state['name']}` is not UTF-8.", param=state["name"]) from None

    parser = MultipartParser(
        options[b"boundary"],
        {
            "on_part_begin": on_part_begin,
            "on_part_data": on_part_data,
            "on_part_end": on_part_end,
            "on_header_field": on_header_field,
            "on_header_value": on_header_value,
            "on_header_end": on_header_end,
            "on_headers_finished": on_headers_finished,
        },
    )
    try:
        async for chunk in body:
            parser.write(chunk)
        parser.finalize()
    except (APIError, RegistryError, DeltaError):  # the sink's own refusals (file names, size limit) pass through
        raise
    except Exception as e:  # python-multipart's own parse errors
        raise APIError(400, f"Malformed multipart body: {e}") from None
