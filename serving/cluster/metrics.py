"""The replicas' engine metrics on the ingress's /metrics, each sample labelled with its `replica`.

Each replica keeps its own EngineMetrics (serving.metrics) and posts their families to the Board about once a
second (serving.cluster.replica); this collector merges them, family by family, into the ingress's registry. A
dashboard's sums over `replica` read as one server's figures; `by (replica)` shows each.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client.core import Metric
from prometheus_client.registry import Collector

REPLICA_LABEL = "replica"  # on every engine metric of a cluster's /metrics: the replica's Ray Serve id


class ReplicaMetrics(Collector):
    def __init__(self, reports: Callable[[], dict[str, Any]]):
        """reports(): each live replica's latest report (ClusterGeneration.reports)."""
        self.reports = reports

    def collect(self) -> Iterator[Metric]:
        merged: dict[str, Metric] = {}
        for replica, report in sorted(self.reports().items()):
            for family in report.get("families", ()):
                out = merged.get(family.name)
                if out is None:
                    out = merged[family.name] = Metric(family.name, family.documentation, family.type, family.unit)
                for sample in family.samples:
                    out.samples.append(sample._replace(labels={**sample.labels, REPLICA_LABEL: replica}))
        yield from merged.values()

    def describe(self) -> list[Metric]:
        return []  # the families depend on the replicas' reports: collected at each scrape, never cached
