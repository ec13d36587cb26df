"""`GET /v1/usage`: requests and tokens per tenant, model and period, for billing (serving.usage counts them,
registry.usage keeps them). A tenant's key reads its own usage only; the admin key every tenant's, deleted
ones' too."""

from __future__ import annotations

import asyncio
import time
from typing import Annotated

from fastapi import APIRouter, Query, Request

from registry.usage import GRANULARITIES
from serving.api.auth import TenantOrAdmin
from serving.api.errors import APIError
from serving.api.openapi import documented
from serving.api.schemas import DEFAULT_USAGE_PERIODS, MAX_USAGE_PERIODS, UsageQuery, UsageReport

router = APIRouter()


@router.get("/v1/usage", response_model=UsageReport, **documented(key="own or all", errors=(400,)))
async def usage(request: Request, caller: TenantOrAdmin, query: Annotated[UsageQuery, Query()]):
    backend = request.app.state.backend
    if caller is not None and query.tenant not in (None, caller.name):
        raise APIError(403, "Only the admin key reads another tenant's usage.", param="tenant", code="admin_required")
    step = GRANULARITIES[query.granularity]
    end = query.end if query.end is not None else int(time.time()) + 1
    start = query.start if query.start is not None else max(0, end - DEFAULT_USAGE_PERIODS[query.granularity] * step)
    if start >= end:
        raise APIError(400, "start must be before end.", param="start")
    if end - start > MAX_USAGE_PERIODS[query.granularity] * step:
        raise APIError(400, f"One report covers at most {MAX_USAGE_PERIODS[query.granularity]} periods of one "
                       f"{query.granularity}: ask for a shorter window or by the day.", param="start")  # fmt: skip
    tenant = caller.name if caller is not None else query.tenant
    adapter = None if query.model is None else "" if query.model == backend.model_id else query.model
    await asyncio.to_thread(backend.usage.flush)  # what was answered up to now is in the report
    rows = await asyncio.to_thread(
        backend.registry.usage, tenant=tenant, start=start, end=end, granularity=query.granularity, adapter=adapter
    )
    data = [{"tenant": r.tenant, "model": r.adapter if r.adapter is not None else backend.model_id,
             "period_start": r.period_start, "requests": r.requests, "prompt_tokens": r.prompt_tokens,
             "completion_tokens": r.completion_tokens, "total_tokens": r.total_tokens} for r in rows]  # fmt: skip
    total = {k: sum(d[k] for d in data) for k in ("requests", "prompt_tokens", "completion_tokens", "total_tokens")}
    return {"object": "list", "granularity": query.granularity, "start": start, "end": end, "data": data,
            "total": total}  # fmt: skip
