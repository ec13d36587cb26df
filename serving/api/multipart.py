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
    reader = _PartReader(sink)
    parser = MultipartParser(options[b"boundary"], reader.callbacks())
    try:
        async for chunk in body:
            parser.write(chunk)
        parser.finalize()
    except (APIError, RegistryError, DeltaError):  # the sink's own refusals (file names, size limit) pass through
        raise
    except Exception as e:  # python-multipart's own parse errors
        raise APIError(400, f"Malformed multipart body: {e}") from None


class _PartReader:
    """python-multipart's callbacks: the part being read (its headers, name, filename, a form field's bytes)."""

    def __init__(self, sink: PartSink):
        self.sink = sink
        self.parts = 0
        self.headers: dict[bytes, bytes] = {}
        self.field, self.value = b"", b""  # the header being read
        self.name: str | None = None
        self.filename: str | None = None
        self.buf = bytearray()

    def callbacks(self) -> dict:
        return {"on_part_begin": self.part_begin, "on_part_data": self.part_data, "on_part_end": self.part_end,
                "on_header_field": self.header_field, "on_header_value": self.header_value,
                "on_header_end": self.header_end, "on_headers_finished": self.headers_finished}  # fmt: skip

    def part_begin(self) -> None:
        self.headers, self.name, self.filename, self.buf = {}, None, None, bytearray()
        self.parts += 1
        if self.parts > MAX_PARTS:
            raise APIError(400, f"At most {MAX_PARTS} parts per upload.")

    def header_field(self, data, start, end) -> None:
        self.field += data[start:end]

    def header_value(self, data, start, end) -> None:
        self.value += data[start:end]

    def header_end(self) -> None:
        self.headers[self.field.lower()] = self.value
        self.field, self.value = b"", b""

    def headers_finished(self) -> None:
        disposition, params = parse_options_header(self.headers.get(b"content-disposition", b""))
        if disposition != b"form-data" or b"name" not in params:
            raise APIError(400, "Each multipart part needs a Content-Disposition: form-data header with a name.")
        self.name = params[b"name"].decode("utf-8", "replace")
        if b"filename" in params:
            self.filename = params[b"filename"].decode("utf-8", "replace")
            self.sink.begin_file(self.name, self.filename)

    def part_data(self, data, start, end) -> None:
        if self.filename is not None:
            self.sink.file_data(bytes(data[start:end]))
            return
        self.buf += data[start:end]
        if len(self.buf) > MAX_FIELD_BYTES:
            raise APIError(400, f"Form field `{self.name}` is over {MAX_FIELD_BYTES} bytes.", param=self.name)

    def part_end(self) -> None:
        if self.filename is not None:
            self.sink.end_file()
        elif self.name is not None:
            try:
                self.sink.field(self.name, self.buf.decode("utf-8"))
            except UnicodeDecodeError:
                raise APIError(400, f"Form field `{self.name}` is not UTF-8.", param=self.name) from None
