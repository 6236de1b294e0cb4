"""The gateway's ``/metrics``: what its clients asked for, and the cluster as its node sees it.

Request metrics (``macmesh_gateway_*``: requests by API, engine and outcome, tokens in and out,
time to first token, inter-token latency, native-MTP proposed / accepted draft tokens per
model) are counted as requests pass. The cluster's gauges are read from ``ClusterStatus`` at
each scrape: node memory (total and available) and state, and each instance's engine,
stage count and recent tok/s. Per-daemon detail (queue length, batch size, stage hops) is on
each daemon's own ``--metrics-port``.
"""

from __future__ import annotations

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from node.client import ClusterStatus, MacmeshError
from node.gateway.generation import CLIENT, METRICS
from node.metrics import GenerationMetrics

PREFIX = "macmesh_gateway"


def gateway_metrics() -> GenerationMetrics:
    return GenerationMetrics(CollectorRegistry(), PREFIX, labels=("api",), mtp_label="model")


class _ClusterGauges(Collector):
    def __init__(self, status: ClusterStatus | None) -> None:
        self.status = status

    def collect(self):  # type: ignore[no-untyped-def]
        up = GaugeMetricFamily(
            f"{PREFIX}_cluster_up", "1 when the gateway's node answered ClusterStatus"
        )
        up.add_metric([], 0 if self.status is None else 1)
        yield up
        node_labels = ["node", "name", "state"]
        total = GaugeMetricFamily(
            "macmesh_cluster_node_memory_total_bytes", "node memory", labels=node_labels
        )
        free = GaugeMetricFamily(
            "macmesh_cluster_node_memory_available_bytes",
            "node memory available to models",
            labels=node_labels,
        )
        instance_labels = ["instance", "model", "engine", "state"]
        tps = GaugeMetricFamily(
            "macmesh_cluster_instance_recent_generation_tps",
            "recent decode tokens per second",
            labels=instance_labels,
        )
        stages = GaugeMetricFamily(
            "macmesh_cluster_instance_stages", "pipeline stages", labels=instance_labels
        )
        for node in self.status.nodes if self.status else []:
            values = [node.node_id, node.name, node.state]
            total.add_metric(values, node.memory_total_bytes)
            free.add_metric(values, node.memory_available_bytes)
        for inst in self.status.instances if self.status else []:
            values = [inst.instance_id, inst.model, inst.engine, inst.state]
            tps.add_metric(values, inst.recent_generation_tps)
            stages.add_metric(values, len(inst.stages))
        yield from (total, free, tps, stages)


async def metrics_endpoint(request: web.Request) -> web.Response:
    try:
        status: ClusterStatus | None = await request.app[CLIENT].cluster_status(timeout=5.0)
    except MacmeshError:
        status = None  # the request metrics are still worth scraping
    cluster = CollectorRegistry()
    cluster.register(_ClusterGauges(status))
    body = generate_latest(request.app[METRICS].registry) + generate_latest(cluster)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})
