"""Prometheus metrics, all in one place. Every name starts with `deltaserve_`.

A `Metrics` object owns its own CollectorRegistry (no module-level singleton), so tests and several
servers in one process never share counters. No metric carries an adapter label, and only the opt-in usage
counters a tenant label: their number is unbounded, and a tenant must not learn about others from /metrics
(which needs the admin key whenever tenants are named). Labels used, with their bounds: route (the fixed API
routes), status (HTTP status codes), model_kind (base | lora | ia3 | bitdelta | composed | none), tier (gpu | host for the
adapter cache counters; gpu_lora | gpu_bitdelta | gpu_ia3 | host for slots in use, the gpu_ ones for capacity), format and outcome of uploads; tenant (the
top N tenants by tokens, N set by --metrics-top-tenants, and `other`: serving.usage) and kind (prompt |
completion) of the usage counters.
"""

from __future__ import annotations

import math

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from registry.upload_formats import FORMATS


def log_buckets(lo: float, hi: float, per_decade: int = 32) -> tuple[float, ...]:
    """Bucket bounds from about lo to about hi, `per_decade` per factor of 10 (each 1.075x the last at 32), rounded
    to 3 significant digits. histogram_quantile interpolates linearly inside a bucket, so where the observations
    bunch up (a p99 among many requests of one length) its error approaches the bucket's width: with 1-2.5-5
    buckets an end-to-end p99 of 1.73 s read 2.45 s; 16 per decade (1.155x) still read a p99 10 % high in
    tests/test_prometheus_live.py, which at 32 per decade keeps every quantile within 10 % of the client's."""
    first, last = round(math.log10(lo) * per_decade), round(math.log10(hi) * per_decade)
    return tuple(float(f"{10 ** (i / per_decade):.3g}") for i in range(first, last + 1))


# Ranges from the measured distributions: TTFT from a few ms (a GPU, a short prompt) to a minute (a CPU server
# flooded: the soak's p95 was 3.3 s); end-to-end up to 10 minutes (long generations); inter-token and step times
# from 0.5 ms (a GPU step of a small model) to 5 s (a CPU prefill of a long prompt). About 540 bucket series for
# these four histograms (none has a label): the price of quantiles that can be trusted. Adapter load times, only
# watched for their order of magnitude, keep 8 per decade (per tier).
LATENCY_BUCKETS = log_buckets(0.005, 60.0)
REQUEST_LATENCY_BUCKETS = log_buckets(0.01, 600.0)
TOKEN_LATENCY_BUCKETS = log_buckets(0.0005, 5.0)
LOAD_BUCKETS = log_buckets(0.001, 60.0, per_decade=8)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class EngineMetrics:
    """What one engine measures of itself: its steps, queues, KV cache and delta tiers. In one server they are
    exported with the API's (`Metrics.engine`); each replica of a cluster keeps its own, exported with a `replica`
    label (serving.cluster)."""

    def __init__(self, r: CollectorRegistry) -> None:
        # Declared one after another so that they are read in one place.
        self.queue_length = Gauge("deltaserve_queue_length", "Sequences waiting to be scheduled", registry=r)
        self.running = Gauge("deltaserve_running_sequences", "Sequences in the running batch", registry=r)
        self.batch_size = Histogram("deltaserve_step_batch_size", "Sequences per engine step", buckets=BATCH_BUCKETS, registry=r)
        self.distinct_tenants = Histogram(
            "deltaserve_step_distinct_adapters", "Distinct deltas (tenants' fine-tunes) per engine step, base excluded",
            buckets=BATCH_BUCKETS, registry=r,
        )
        self.step_time = Histogram("deltaserve_step_seconds", "Duration of one engine step", buckets=TOKEN_LATENCY_BUCKETS, registry=r)
        self.kv_usage = Gauge("deltaserve_kv_cache_usage_ratio", "Share of KV-cache blocks in use (0..1)", registry=r)
        self.preemptions = Counter("deltaserve_preemptions", "Sequences preempted for lack of KV blocks", registry=r)
        self.generation_tokens = Counter("deltaserve_generation_tokens", "Generated tokens", registry=r)
        self.adapter_hits = Counter("deltaserve_adapter_cache_hits", "Adapter found resident in a tier", ["tier"], registry=r)
        self.adapter_misses = Counter("deltaserve_adapter_cache_misses", "Adapter not resident in a tier", ["tier"], registry=r)
        self.adapter_loads = Counter("deltaserve_adapter_loads", "Adapters loaded into a tier", ["tier"], registry=r)
        self.adapter_evictions = Counter("deltaserve_adapter_evictions", "Adapters evicted from a tier", ["tier"], registry=r)
        self.adapter_load_seconds = Histogram(
            "deltaserve_adapter_load_seconds", "Time to load an adapter into a tier", ["tier"], buckets=LOAD_BUCKETS, registry=r
        )
        self.slots_in_use = Gauge("deltaserve_adapter_slots_in_use", "Adapters resident per tier", ["tier"], registry=r)
        self.slots_total = Gauge("deltaserve_adapter_slots", "Capacity per GPU tier (adapters)", ["tier"], registry=r)
        # the host tier is sized in bytes, not in adapters
        self.host_bytes = Gauge("deltaserve_host_tier_bytes", "Bytes of deltas held in the host-memory tier", registry=r)
        self.host_capacity = Gauge(
            "deltaserve_host_tier_capacity_bytes", "Capacity of the host-memory tier (--host-cache-mb)", registry=r
        )

        # Every bounded label value exists from the start, so dashboards see zeros rather than gaps.
        for tier in ("gpu", "host"):
            for family in (self.adapter_hits, self.adapter_misses, self.adapter_loads, self.adapter_evictions,
                           self.adapter_load_seconds):
                family.labels(tier)
        for tier in ("gpu_lora", "gpu_bitdelta", "gpu_ia3", "host"):
            self.slots_in_use.labels(tier)
        for tier in ("gpu_lora", "gpu_bitdelta", "gpu_ia3"):
            self.slots_total.labels(tier)


class Metrics:
    def __init__(self, engine_side: bool = True) -> None:
        """engine_side: this process runs the engine (its figures are exported here); False for a cluster's ingress."""
        # Over 40 lines: every metric of the API /metrics exports, declared one after another (the engine's: above).
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
            buckets=REQUEST_LATENCY_BUCKETS, registry=r,
        )
        self.pending = Gauge("deltaserve_pending_requests", "Requests accepted and not finished (queue bound)", registry=r)
        self.max_pending = Gauge(
            "deltaserve_max_pending_requests", "Bound on pending requests (--max-pending); beyond it: 503", registry=r
        )
        # the HTTP server can outlive its engine thread (then every generation is a 503): /health's answer, scraped
        self.engine_up = Gauge("deltaserve_engine_up", "Whether the engine thread runs (1), or has died (0)", registry=r)
        self.prompt_tokens = Counter("deltaserve_prompt_tokens", "Prompt tokens of finished requests", registry=r)
        # the engine's own figures: here, or per replica (serving.cluster) when the engines run elsewhere
        self.engine = EngineMetrics(r) if engine_side else None
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
        for fmt in FORMATS:  # every upload outcome too (a refused upload's first burst must show in increase())
            for outcome in ("accepted", "refused", *(("ready", "failed") if fmt == "finetune" else ())):
                self.uploads.labels(fmt, outcome)
        # (the request series, per route: serving.api.app.zero_request_series)

    def render(self) -> bytes:
        return generate_latest(self.registry)
