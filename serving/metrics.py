"""Prometheus metrics, all in one place. Every name starts with `deltaserve_`.

A `Metrics` object owns its own CollectorRegistry (no module-level singleton), so tests and several
servers in one process never share counters. No metric carries an adapter label, and only the opt-in usage
counters a tenant label: their number is unbounded, and a tenant must not learn about others from /metrics
(which needs the admin key whenever tenants are named). Labels used, with their bounds: route (the fixed API
routes), status (HTTP status codes), model_kind (base | lora | bitdelta | none), tier (gpu | host for the
adapter cache counters; gpu_lora | gpu_bitdelta | host for slots in use, gpu_lora | gpu_bitdelta for capacity), format and outcome of uploads; tenant (the
top N tenants by tokens, N set by --metrics-top-tenants, and `other`: serving.usage) and kind (prompt |
completion) of the usage counters.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from registry.upload_formats import FORMATS

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
TOKEN_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter(
            "deltaserve_requests", "HTTP requests by route, status and model kind", ["route", "status", "model_kind"], registry=r
        )
        self.ttft = Histogram(
            "deltaserve_time_to_first_token_seconds", "Time from arrival to the first generated token",
            buckets=LATENCY_BUCKETS, registry=r,
        )
        self.inter_token = Histogram(
            "deltaserve_inter_token_latency_seconds", "Time between consecutive tokens of a request",
            buckets=TOKEN_LATENCY_BUCKETS, registry=r,
        )
        self.e2e = Histogram(
            "deltaserve_request_latency_seconds", "Time from arrival to the last token of a generation request",
            buckets=LATENCY_BUCKETS, registry=r,
        )
        self.queue_length = Gauge("deltaserve_queue_length", "Sequences waiting to be scheduled", registry=r)
        self.running = Gauge("deltaserve_running_sequences", "Sequences in the running batch", registry=r)
        self.pending = Gauge("deltaserve_pending_requests", "Requests accepted and not finished (queue bound)", registry=r)
        self.max_pending = Gauge(
            "deltaserve_max_pending_requests", "Bound on pending requests (--max-pending); beyond it: 503", registry=r
        )
        # the HTTP server can outlive its engine thread (then every generation is a 503): /health's answer, scraped
        self.engine_up = Gauge("deltaserve_engine_up", "Whether the engine thread runs (1), or has died (0)", registry=r)
        self.batch_size = Histogram("deltaserve_step_batch_size", "Sequences per engine step", buckets=BATCH_BUCKETS, registry=r)
        self.distinct_tenants = Histogram(
            "deltaserve_step_distinct_adapters", "Distinct deltas (tenants' fine-tunes) per engine step, base excluded",
            buckets=BATCH_BUCKETS, registry=r,
        )
        self.step_time = Histogram("deltaserve_step_seconds", "Duration of one engine step", buckets=TOKEN_LATENCY_BUCKETS, registry=r)
        self.kv_usage = Gauge("deltaserve_kv_cache_usage_ratio", "Share of KV-cache blocks in use (0..1)", registry=r)
        self.preemptions = Counter("deltaserve_preemptions", "Sequences preempted for lack of KV blocks", registry=r)
        self.prompt_tokens = Counter("deltaserve_prompt_tokens", "Prompt tokens of finished requests", registry=r)
        self.generation_tokens = Counter("deltaserve_generation_tokens", "Generated tokens", registry=r)
        self.adapter_hits = Counter("deltaserve_adapter_cache_hits", "Adapter found resident in a tier", ["tier"], registry=r)
        self.adapter_misses = Counter("deltaserve_adapter_cache_misses", "Adapter not resident in a tier", ["tier"], registry=r)
        self.adapter_loads = Counter("deltaserve_adapter_loads", "Adapters loaded into a tier", ["tier"], registry=r)
        self.adapter_evictions = Counter("deltaserve_adapter_evictions", "Adapters evicted from a tier", ["tier"], registry=r)
        self.adapter_load_seconds = Histogram(
            "deltaserve_adapter_load_seconds", "Time to load an adapter into a tier", ["tier"], buckets=LATENCY_BUCKETS, registry=r
        )
        self.slots_in_use = Gauge("deltaserve_adapter_slots_in_use", "Adapters resident per tier", ["tier"], registry=r)
        self.slots_total = Gauge("deltaserve_adapter_slots", "Capacity per GPU tier (adapters)", ["tier"], registry=r)
        # the host tier is sized in bytes, not in adapters
        self.host_bytes = Gauge("deltaserve_host_tier_bytes", "Bytes of deltas held in the host-memory tier", registry=r)
        self.host_capacity = Gauge(
            "deltaserve_host_tier_capacity_bytes", "Capacity of the host-memory tier (--host-cache-mb)", registry=r
        )
        self.tenant_requests = Counter(
            "deltaserve_tenant_requests", "Answered requests per tenant (top N by tokens, the rest `other`)", ["tenant"],
            registry=r,
        )
        self.tenant_tokens = Counter(
            "deltaserve_tenant_tokens", "Prompt and completion tokens per tenant (top N by tokens, the rest `other`)",
            ["tenant", "kind"], registry=r,
        )  # fmt: skip
        self.uploads = Counter("deltaserve_adapter_uploads", "Adapter uploads by format and outcome", ["format", "outcome"], registry=r)

        # Every bounded label value exists from the start, so dashboards see zeros rather than gaps.
        for tier in ("gpu", "host"):
            for family in (self.adapter_hits, self.adapter_misses, self.adapter_loads, self.adapter_evictions,
                           self.adapter_load_seconds):
                family.labels(tier)
        for tier in ("gpu_lora", "gpu_bitdelta", "host"):
            self.slots_in_use.labels(tier)
        for tier in ("gpu_lora", "gpu_bitdelta"):
            self.slots_total.labels(tier)
        for fmt in FORMATS:  # every upload outcome too (a refused upload's first burst must show in increase())
            for outcome in ("accepted", "refused", *(("ready", "failed") if fmt == "finetune" else ())):
                self.uploads.labels(fmt, outcome)
        # (the request series, per route: serving.api.app.zero_request_series)

    def render(self) -> bytes:
        return generate_latest(self.registry)
