"""Tenants (admin), adapters (tenant), health, readiness and metrics."""

from __future__ import annotations

import logging

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool

from registry.errors import NotFound
from registry.names import validate_name
from registry.recipe import Recipe
from registry.upload_formats import FORMATS
from serving.api.auth import Admin, TenantDep, require_admin
from serving.api.bodies import parse, read_json
from serving.api.errors import APIError, refuse_when_draining
from serving.api.multipart import parse_multipart
from serving.api.openapi import documented
from serving.api.schemas import (
    MAX_CALIBRATION_BYTES,
    AdapterList,
    AdapterObject,
    Recompress,
    Status,
    TenantCreate,
    TenantCreated,
    TenantList,
)

router = APIRouter()
log = logging.getLogger("deltaserve")

# A full fine-tune is compressed after the upload: 202 with the adapter `compressing` (its progress in
# GET /v1/adapters/{name}); the other formats are checked and stored at once (201, `ready`).
ACCEPTED = {202: {"model": AdapterObject, "description": "A full fine-tune: stored, compressing in the background."}}


# ---- tenants (admin) ------------------------------------------------------------------------------
@router.post(
    "/v1/tenants",
    status_code=201,
    response_model=TenantCreated,
    **documented(key="admin", body=TenantCreate, errors=(400, 409, 413, 507)),
)
async def create_tenant(request: Request, _: Admin):
    req: TenantCreate = parse(TenantCreate, await read_json(request))
    name = validate_name("tenant", req.name)
    tenant, key = request.app.state.backend.registry.create_tenant(name)
    return JSONResponse({"name": tenant.name, "api_key": key, "created": tenant.created}, status_code=201)


@router.get("/v1/tenants", response_model=TenantList, **documented(key="admin"))
async def list_tenants(request: Request, _: Admin):
    tenants = request.app.state.backend.registry.list_tenants()
    return {"object": "list", "data": [{"name": t.name, "created": t.created} for t in tenants]}


@router.delete("/v1/tenants/{name}", status_code=204, **documented(key="admin", errors=(404,)))
async def delete_tenant(request: Request, name: str, _: Admin):
    request.app.state.backend.adapters.delete_tenant(name)
    return Response(status_code=204)


# ---- adapters (tenant) ----------------------------------------------------------------------------
class _UploadSink:
    """Receives the multipart parts of an upload: small fields in memory, files streamed into the staging
    directory (the staging object checks file names and the size limit as bytes arrive)."""

    def __init__(self, staging):
        self.staging = staging
        self.fields: dict[str, str] = {}
        self._writer = None
        self.calibration: bytearray | None = None  # a fine-tune's calibration text (a file part, in memory)
        self._in_calibration = False

    def field(self, name: str, value: str) -> None:
        if name not in ("name", "format", "scale", "distill_steps"):
            raise APIError(400, f"Unknown form field `{name}`; expected name, format, files (and for a fine-tune "
                           "scale, distill_steps, calibration).", param=name)  # fmt: skip
        self.fields[name] = value

    def begin_file(self, field: str, filename: str) -> None:
        if field == "calibration" and self.calibration is None:
            self.calibration, self._in_calibration = bytearray(), True
            return
        if field not in ("files", "file"):
            raise APIError(400, f"File parts must be sent as `files` (or one `calibration` text), not `{field}`.",
                           param=field)  # fmt: skip
        self._writer = self.staging.open_file(filename)

    def file_data(self, data: bytes) -> None:
        if self._in_calibration:
            self.calibration += data
            if len(self.calibration) > MAX_CALIBRATION_BYTES:
                raise APIError(400, f"The calibration text is over {MAX_CALIBRATION_BYTES} bytes.", param="calibration")
            return
        self._writer.write(data)

    def end_file(self) -> None:
        if self._in_calibration:
            self._in_calibration = False
            return
        self._writer.close()
        self._writer = None

    def recipe(self, fmt: str) -> Recipe | None:
        """The fine-tune's compression settings from the form (None for the other formats: refused if given)."""
        given = {k: self.fields[k] for k in ("scale", "distill_steps") if k in self.fields}
        if fmt != "finetune":
            if given or self.calibration is not None:
                param = next(iter(given), "calibration")
                raise APIError(400, f"`{param}` applies to a full fine-tune only.", param=param)
            return None
        if "distill_steps" in given:
            if not given["distill_steps"].isdigit():
                raise APIError(400, "Form field `distill_steps` must be a whole number.", param="distill_steps")
            given["distill_steps"] = int(given["distill_steps"])
        if self.calibration is not None:
            try:
                given["calibration_text"] = self.calibration.decode("utf-8")
            except UnicodeDecodeError:
                raise APIError(400, "The calibration text must be UTF-8.", param="calibration") from None
        return parse(Recompress, given).recipe()


@router.post(
    "/v1/adapters",
    status_code=201,
    response_model=AdapterObject,
    **documented(key="tenant", multipart=True, errors=(400, 409, 413, 415, 503, 507), answers=ACCEPTED),
)
async def upload_adapter(request: Request, tenant: TenantDep):
    backend = request.app.state.backend
    refuse_when_draining(backend)
    limit = backend.config.max_upload_bytes
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit + (1 << 20):
        raise APIError(413, f"Upload is over the {limit}-byte limit.")
    staging = backend.adapters.stage(tenant)
    sink = _UploadSink(staging)
    fmt = "unknown"
    try:
        await parse_multipart(request.headers.get("content-type", ""), request.stream(), sink)
        if "name" not in sink.fields:
            raise APIError(400, "Missing form field `name`.", param="name")
        if sink.fields.get("format") not in FORMATS:
            raise APIError(400, f"Form field `format` must be one of {', '.join(FORMATS)}.", param="format")
        fmt = sink.fields["format"]
        name = validate_name("adapter", sink.fields["name"])
        if name == backend.model_id:
            raise APIError(400, f"`{name}` is the base model's id; choose another adapter name.", param="name")
        record = await backend.adapters.commit_upload(tenant, name, fmt, staging, sink.recipe(fmt))
    except BaseException:
        staging.discard()
        backend.metrics.uploads.labels(fmt, "refused").inc()
        raise
    backend.metrics.uploads.labels(fmt, "accepted").inc()
    return JSONResponse(AdapterObject.of(record), status_code=202 if fmt == "finetune" else 201)


@router.get("/v1/adapters", response_model=AdapterList, **documented(key="tenant"))
async def list_adapters(request: Request, tenant: TenantDep):
    records = request.app.state.backend.registry.list_adapters(tenant.name)
    return {"object": "list", "data": [AdapterObject.of(r) for r in records]}


@router.get("/v1/adapters/{name}", response_model=AdapterObject, **documented(key="tenant", errors=(404,)))
async def get_adapter(request: Request, name: str, tenant: TenantDep):
    record = request.app.state.backend.registry.get_adapter(tenant.name, name)
    if record is None:
        raise NotFound(f"No adapter named `{name}`.", param="name")
    return AdapterObject.of(record)


@router.post("/v1/adapters/{name}/recompress", status_code=202, response_model=AdapterObject,
             **documented(key="tenant", body=Recompress, errors=(400, 404, 409, 429, 503)))  # fmt: skip
async def recompress_adapter(request: Request, name: str, tenant: TenantDep):
    backend = request.app.state.backend
    refuse_when_draining(backend)
    recipe = parse(Recompress, await read_json(request)).recipe()
    record = await run_in_threadpool(backend.adapters.recompress, tenant, name, recipe)
    return JSONResponse(AdapterObject.of(record), status_code=202)


DOWNLOADED = {200: {"description": "The version's files as they were uploaded, in a POSIX tar archive (plain files, no "
                   "folders; each member's pax header `DELTASERVE.sha256` holds the file's sha256), streamed with "
                   "its exact Content-Length: a response that ends short of it is a failed download.",
                   "content": {"application/x-tar": {"schema": {"type": "string", "format": "binary"}}}}}


@router.get("/v1/adapters/{name}/download", response_class=StreamingResponse,
            **documented(key="tenant", errors=(404, 409, 429), answers=DOWNLOADED))  # fmt: skip
async def download_adapter(request: Request, name: str, tenant: TenantDep):
    adapters = request.app.state.backend.adapters
    stream = await run_in_threadpool(adapters.download, tenant, name)
    chunks = iter(stream)

    async def body():
        try:
            while (chunk := await run_in_threadpool(next, chunks, None)) is not None:  # decoding: off the loop
                yield chunk
        except Exception as e:  # a stored file that does not decode: the response ends short of its length
            log.error("download of %s's adapter %s failed: %s", tenant.name, name, e)
        finally:  # the end, a failed decode, or a client gone: the files and the tenant's download slot go.
            stream.close()  # not awaited: under a cancellation an await would raise again before it ran

    headers = {"Content-Length": str(stream.size),
               "Content-Disposition": f'attachment; filename="{name}.tar"'}  # fmt: skip
    return StreamingResponse(body(), media_type="application/x-tar", headers=headers)


@router.delete("/v1/adapters/{name}", status_code=204, **documented(key="tenant", errors=(404,)))
async def delete_adapter(request: Request, name: str, tenant: TenantDep):
    request.app.state.backend.adapters.delete_adapter(tenant, name)
    return Response(status_code=204)


# ---- operations -----------------------------------------------------------------------------------
@router.get("/health", response_model=Status, responses={503: {"model": Status, "description": "The engine is dead."}})
async def health(request: Request):
    if not request.app.state.backend.healthy:
        return JSONResponse({"status": "dead"}, status_code=503)
    return {"status": "ok"}


@router.get(
    "/ready",
    response_model=Status,
    responses={503: {"model": Status, "description": "Starting, draining or dead: send no traffic here."}},
)
async def ready(request: Request):
    backend = request.app.state.backend
    if not backend.ready:
        status = "draining" if backend.draining else "starting" if backend.healthy else "dead"
        return JSONResponse({"status": status}, status_code=503)
    return {"status": "ok"}


@router.get(
    "/metrics",
    response_class=PlainTextResponse,
    **documented(key="admin unless public", answers={200: {"description": "Prometheus text exposition format."}}),
)
async def metrics(request: Request):
    if not request.app.state.public_metrics:
        require_admin(request)
    from serving.metrics import CONTENT_TYPE

    # Rendering every series takes 10-40 ms of Python: off the event loop, or each scrape would hold back every
    # tenant's requests arriving meanwhile (before their arrival is even stamped, so no histogram would show it).
    body = await run_in_threadpool(request.app.state.backend.metrics.render)
    return Response(body, media_type=CONTENT_TYPE)
