"""Every bounded label set exists at 0 from the start (issue: the first burst of a new status was invisible to
rate()/increase(), which need two samples of a series): the statuses each route documents, per model kind on the
generation routes, and every upload outcome."""

from __future__ import annotations

import re
from types import SimpleNamespace

from serving.api.app import KNOWN_ROUTES, create_app
from serving.metrics import Metrics


def _series(text: str, name: str) -> dict[str, float]:
    return {m.group(1): float(m.group(2)) for m in re.finditer(re.escape(name) + r'(\{(?:[^"}]|"[^"]*")*\}) ([0-9.e+-]+)', text)}


def test_a_fresh_server_has_every_documented_status_at_zero() -> None:
    metrics = Metrics()
    create_app(SimpleNamespace(metrics=metrics))
    text = metrics.render().decode()
    requests = _series(text, "deltaserve_requests_total")
    for route in ("/v1/completions", "/v1/chat/completions"):
        for status in ("200", "400", "429", "499", "500", "503"):
            for kind in ("base", "lora", "bitdelta", "none"):
                assert requests[f'{{model_kind="{kind}",route="{route}",status="{status}"}}'] == 0, (route, status, kind)
    assert requests['{model_kind="none",route="/v1/adapters",status="413"}'] == 0
    assert requests['{model_kind="none",route="/v1/tenants/{name}",status="204"}'] == 0
    assert requests['{model_kind="none",route="/v1/models/{id}",status="404"}'] == 0
    routes = {re.search(r'route="([^"]*)"', k).group(1) for k in requests}
    assert routes <= KNOWN_ROUTES | {"/v1/tenants/{name}", "/v1/adapters/{name}", "/v1/models/{id}"}
    assert len(requests) < 300  # bounded: documented statuses only, never a user's name
    uploads = _series(text, "deltaserve_adapter_uploads_total")
    for fmt in ("lora", "bitdelta", "finetune"):
        assert uploads[f'{{format="{fmt}",outcome="refused"}}'] == 0
    assert uploads['{format="finetune",outcome="failed"}'] == 0
