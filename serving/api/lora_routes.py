"""vLLM's dynamic LoRA routes on the registry: `POST /v1/load_lora_adapter` stores a PEFT adapter directory of the
server's disk as a tenant's adapter, `POST /v1/unload_lora_adapter` deletes one.

vLLM has one namespace of adapters; here every adapter is a tenant's. Reading the server's disk is the admin's
alone, and only inside --allowed-local-adapter-dir: the admin names the tenant (`tenant`, an extension of vLLM's
body). A tenant key may unload its own adapters (and uploads them over HTTP: POST /v1/adapters). A loaded adapter
is checked and stored exactly as an upload of its two files (registry/uploads.py).
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

from fastapi import APIRouter, Request, Response
from fastapi.responses import PlainTextResponse
from pydantic import BaseModel, ConfigDict

from registry.errors import NotFound
from registry.names import validate_name
from serving.api.auth import TenantOrAdmin
from serving.api.bodies import parse, read_json
from serving.api.errors import APIError, refuse_when_draining
from serving.api.openapi import documented
from serving.api.schemas import Name

router = APIRouter()

LORA_FILES = ("adapter_config.json", "adapter_model.safetensors")  # what is read of the directory (no pickles)
_CHUNK = 1 << 20


class LoadLoRAAdapterRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    lora_name: Name
    lora_path: str
    tenant: Name | None = None  # with the admin key: whose adapter it becomes
    load_inplace: bool = False  # replace an adapter of this name (a new version) instead of refusing


class UnloadLoRAAdapterRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    lora_name: Name
    tenant: Name | None = None  # with the admin key: whose adapter to delete
    lora_int_id: int | None = None  # vLLM's; ignored (names identify adapters here)


def _tenant_named(request: Request, caller, name: str | None):
    """The tenant the request acts for: the caller's own, or with the admin key the one named by `tenant`."""
    if caller is not None:
        if name is not None and name != caller.name:
            raise APIError(400, "`tenant` is for the admin key; a tenant key acts on its own adapters.", param="tenant")
        return caller
    if name is None:
        raise APIError(400, "With the admin key, name the tenant whose adapter this is (`tenant`).", param="tenant")
    tenant = request.app.state.backend.registry.get_tenant(name)
    if tenant is None:
        raise NotFound(f"No tenant named `{name}`.", param="tenant")
    return tenant


def resolve_local_dir(root: Path | None, given: str) -> Path:
    """`given` (absolute, or relative to `root`) as a real directory inside `root`, symbolic links resolved;
    400 naming lora_path otherwise. root None: loading by path is off (403)."""
    if root is None:
        raise APIError(403, "Loading adapters by path is off: start the server with --allowed-local-adapter-dir DIR.",
                       param="lora_path", code="local_path_forbidden")  # fmt: skip
    if "\x00" in given or not given:
        raise APIError(400, "lora_path must be a non-empty path.", param="lora_path")
    real_root = root.resolve()
    real = (real_root / given).resolve()  # an absolute `given` replaces the root here
    if not real.is_relative_to(real_root):
        raise APIError(400, "lora_path must be inside the allowed adapter directory.", param="lora_path")
    if not real.is_dir():
        raise APIError(400, "lora_path is not a directory of the allowed adapter directory.", param="lora_path")
    return real


def _copy_into(staging, folder: Path) -> None:
    """The adapter's files into the staging (size limit and quota as for an upload); nothing read through a link."""
    for name in LORA_FILES:
        try:
            fd = os.open(folder / name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:
            continue  # the staging's validation names what is missing
        except OSError as e:
            raise APIError(400, f"lora_path's {name} cannot be read: {e.strerror}.", param="lora_path") from None
        with os.fdopen(fd, "rb") as src, staging.open_file(name) as dst:
            while chunk := src.read(_CHUNK):
                dst.write(chunk)


def _peft_type(folder) -> object:
    from registry.errors import DeltaError
    from registry.peft_dir import peft_type

    try:
        return peft_type(folder)
    except DeltaError:
        return None  # the upload's own validation says what is wrong


@router.post(
    "/v1/load_lora_adapter",
    response_class=PlainTextResponse,
    **documented(key="admin", body=LoadLoRAAdapterRequest, errors=(400, 404, 409, 413, 503, 507),
                 answers={200: {"description": "`Success: LoRA adapter '<name>' added successfully.` (vLLM's)"}}),
)  # fmt: skip
async def load_lora_adapter(request: Request, caller: TenantOrAdmin):
    req: LoadLoRAAdapterRequest = parse(LoadLoRAAdapterRequest, await read_json(request))
    if caller is not None:
        raise APIError(403, "Loading an adapter from the server's disk needs the admin key; upload it with "
                       "POST /v1/adapters.", code="admin_required")  # fmt: skip
    backend = request.app.state.backend
    refuse_when_draining(backend)
    tenant = _tenant_named(request, caller, req.tenant)
    name = validate_name("adapter", req.lora_name)
    if name == backend.model_id:
        raise APIError(400, f"`{name}` is the base model's id; choose another adapter name.", param="lora_name")
    if not req.load_inplace and backend.registry.get_adapter(tenant.name, name) is not None:
        raise APIError(409, f"The tenant already has an adapter `{name}` (load_inplace: true replaces it).",
                       param="lora_name")  # fmt: skip
    folder = resolve_local_dir(request.app.state.local_adapter_dir, req.lora_path)
    if (folder / "adapter_config.json").is_file() and _peft_type(folder) == "IA3":
        raise APIError(400, "`lora_path` holds an (IA)^3 adapter, not a LoRA: upload it with POST /v1/adapters "
                            "(format ia3).", param="lora_path", code="adapter_mismatch")  # fmt: skip
    staging = backend.adapters.stage(tenant)
    try:
        await asyncio.get_running_loop().run_in_executor(None, _copy_into, staging, folder)
        await backend.adapters.commit_upload(tenant, name, "lora", staging)
    except BaseException:
        staging.discard()
        backend.metrics.uploads.labels("lora", "refused").inc()
        raise
    backend.metrics.uploads.labels("lora", "accepted").inc()
    return PlainTextResponse(f"Success: LoRA adapter '{name}' added successfully.")


@router.post(
    "/v1/unload_lora_adapter",
    response_class=PlainTextResponse,
    **documented(key="tenant or admin", body=UnloadLoRAAdapterRequest, errors=(400, 404, 413),
                 answers={200: {"description": "`Success: LoRA adapter '<name>' removed successfully.` (vLLM's)"}}),
)  # fmt: skip
async def unload_lora_adapter(request: Request, caller: TenantOrAdmin) -> Response:
    req: UnloadLoRAAdapterRequest = parse(UnloadLoRAAdapterRequest, await read_json(request))
    tenant = _tenant_named(request, caller, req.tenant)
    request.app.state.backend.adapters.delete_adapter(tenant, req.lora_name)
    return PlainTextResponse(f"Success: LoRA adapter '{req.lora_name}' removed successfully.")
