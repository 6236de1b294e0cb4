"""Prometheus metrics of a daemon (``macmesh run --metrics-port``) and of the gateway (``/metrics``).

Every metric lives in a registry of its own process (never prometheus_client's global one, so
two daemons in one test process, or a daemon and a gateway, never share a counter).

A daemon measures what crosses its gRPC server, with server interceptors, so the request path
stays free of metrics code:

- ``InferenceService.Generate``: requests by engine and outcome, prompt and generated tokens,
  time to first token, inter-token latency, and native-MTP proposed / accepted draft tokens per
  instance. A request this node relays to the instance's coordinator is counted and timed
  once, by the coordinator; the relay counts it under ``macmesh_relayed_requests_total``
  (a refusal is counted by every node that answered it: the coordinator and its relay).
- ``StageService.Forward``: ``macmesh_stage_forward_seconds``, from an activation arriving at
  a stage to the token sampled for it leaving this node, on whichever of its Forward streams
  it leaves. The last stage samples every token and sends it straight to the coordinator (the
  ring), so there it is the last stage's compute; earlier stages see a token only when tokens
  travel back up the chain (no return stream), and then it includes every later stage and hop.

At scrape time a collector reads the instances this node coordinates (requests in flight,
queue length, batch size, recent tok/s) and the node's memory. ``set_batch_size`` is how a
batched engine reports its current batch; until one does, an instance that computes counts as
a batch of 1 and, on a single node, the rest of its admitted requests as its queue (a
pipeline has them all in flight at some stage: no queue). See ``batch_and_queue``.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import grpc
from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from node.cluster.peers import is_forwarded
from node.logging import get_logger

log = get_logger(__name__)

GENERATE_METHOD = "/macmesh.v1.InferenceService/Generate"
FORWARD_METHOD = "/macmesh.v1.StageService/Forward"
INSTANCE_KEY = "x-macmesh-instance"  # node.inference.link names a Forward stream's instance

# Seconds. Tokens on a Mac come every few ms to ~100 ms; a first token after a long prefill or
# a queue can take many seconds.
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.035, 0.05, 0.075, 0.1, 0.2, 0.5, 1.0, 5.0)
HOP_BUCKETS = (0.0002, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, 5.0)


class GenerationMetrics:
    """Counters and histograms of generations, in ``registry``, named ``{prefix}_...``.

    ``labels`` are the names every request metric carries besides ``engine`` / ``outcome``
    (the gateway adds ``api``)."""

    def __init__(
        self,
        registry: CollectorRegistry,
        prefix: str,
        labels: tuple[str, ...] = (),
        mtp_label: str = "instance",
    ) -> None:
        self.registry = registry
        self.labels = labels
        self.mtp_label = mtp_label
        engine = [*labels, "engine"]

        def counter(name: str, doc: str, names: list[str]) -> Counter:
            return Counter(f"{prefix}_{name}", doc, names, registry=registry)

        def histogram(name: str, doc: str, buckets: tuple[float, ...]) -> Histogram:
            return Histogram(
                f"{prefix}_{name}", doc, list(labels), buckets=buckets, registry=registry
            )

        self.requests = counter(
            "requests",
            "Generate requests by engine and outcome (stop, length, or the error's code)",
            [*engine, "outcome"],
        )
        self.prompt_tokens = counter("prompt_tokens", "prompt tokens processed", engine)
        self.cached_prompt_tokens = counter(
            "prompt_cache_hit_tokens",
            "prompt tokens the instance's prompt cache served instead of computing them",
            engine,
        )
        self.prompt_cache_hits = counter(
            "prompt_cache_hits",
            "requests that started from a cached prefix of their prompt",
            engine,
        )
        self.generation_tokens = counter("generation_tokens", "tokens generated", engine)
        self.ttft = histogram(
            "time_to_first_token_seconds",
            "from the request's arrival to its first generated token",
            TTFT_BUCKETS,
        )
        self.itl = histogram(
            "inter_token_latency_seconds",
            "time between generated tokens (a delta of n tokens counts n gaps of 1/n its wait)",
            ITL_BUCKETS,
        )
        self.mtp_proposed = counter(
            "mtp_proposed_draft_tokens", "native-MTP draft tokens proposed", [mtp_label]
        )
        self.mtp_accepted = counter(
            "mtp_accepted_draft_tokens", "native-MTP draft tokens the model accepted", [mtp_label]
        )

    def track(self, **labels: str) -> RequestTracker:
        """A tracker for one request whose failures are logged, never raised."""
        return Guarded(RequestTracker(self, {k: labels.get(k, "") for k in self.labels}))  # type: ignore[return-value]


class RequestTracker:
    """One request's timings; ``tokens`` per delta, ``final`` with its stats, ``end`` once."""

    def __init__(self, metrics: GenerationMetrics, labels: dict[str, str]) -> None:
        self.metrics = metrics
        self.labels = labels
        self.began = time.perf_counter()
        self.last: float | None = None
        self.engine = "none"  # until the final stats say which engine ran
        self._ended = False

    def _labelled(self, histogram: Histogram) -> Histogram:
        return histogram.labels(**self.labels) if self.labels else histogram

    def tokens(self, count: int) -> None:
        if count <= 0:
            return
        now = time.perf_counter()
        if self.last is None:
            self._labelled(self.metrics.ttft).observe(now - self.began)
            count -= 1
        elif count:
            gap = (now - self.last) / count
            itl = self._labelled(self.metrics.itl)
            for _ in range(count):
                itl.observe(gap)
        self.last = now

    def final(
        self,
        engine: str,
        prompt_tokens: int,
        generation_tokens: int,
        proposed: int,
        accepted: int,
        instance: str,
        cached_prompt_tokens: int = 0,
    ) -> None:
        self.engine = engine or "none"
        self.metrics.prompt_tokens.labels(**self.labels, engine=self.engine).inc(prompt_tokens)
        self.metrics.cached_prompt_tokens.labels(**self.labels, engine=self.engine).inc(
            cached_prompt_tokens
        )
        if cached_prompt_tokens:
            self.metrics.prompt_cache_hits.labels(**self.labels, engine=self.engine).inc()
        self.metrics.generation_tokens.labels(**self.labels, engine=self.engine).inc(
            generation_tokens
        )
        if engine == "native_mtp" and instance:
            self.metrics.mtp_proposed.labels(instance).inc(proposed)
            self.metrics.mtp_accepted.labels(instance).inc(accepted)

    def end(self, outcome: str) -> None:
        if self._ended:
            return
        self._ended = True
        self.metrics.requests.labels(**self.labels, engine=self.engine, outcome=outcome).inc()


# ----------------------------------------------------------------------------- daemon


_batch_sizes: dict[str, int] = {}
_batch_lock = threading.Lock()


def set_batch_size(instance_id: str, size: int) -> None:
    """A batched engine's current batch (sequences decoded together) for ``instance_id``."""
    with _batch_lock:
        _batch_sizes[instance_id] = max(int(size), 0)


def clear_batch_size(instance_id: str) -> None:
    with _batch_lock:
        _batch_sizes.pop(instance_id, None)


def batch_and_queue(instance_id: str, engine: str, in_flight: int) -> tuple[int, int]:
    """(batch size, queue length) of an instance with ``in_flight`` admitted requests.

    A batched engine's reported batch wins. Otherwise a local / native-MTP instance computes
    one request at a time and the rest wait; a pipeline has every admitted request in flight
    at some stage (each stage computes one frame at a time), so nothing waits in a queue."""
    with _batch_lock:
        reported = _batch_sizes.get(instance_id)
    if reported is not None:
        return reported, max(in_flight - reported, 0)
    size = min(in_flight, 1)
    return size, 0 if engine in ("pipeline", "pipeline_mtp") else max(in_flight - size, 0)


class NodeCollector(Collector):
    """Gauges read at scrape time: this node's memory and the instances it coordinates."""

    def __init__(self, daemon: Any, instances: Callable[[], Iterable[Any]]) -> None:
        self.daemon = daemon
        self.instances = instances

    def collect(self) -> Iterator[GaugeMetricFamily]:
        node = [self.daemon.node_id] if _started(self.daemon) else []
        total = GaugeMetricFamily("macmesh_node_memory_total_bytes", "memory", labels=["node"])
        free = GaugeMetricFamily(
            "macmesh_node_memory_available_bytes", "memory available to models", labels=["node"]
        )
        if node:
            me = next((n for n in self.daemon.cluster_view().nodes if n.local), None)
            if me is not None:
                total.add_metric(node, me.total_memory_bytes)
                free.add_metric(node, me.available_memory_bytes)
        yield total
        yield free
        labels = ["instance", "model", "engine"]
        in_flight = GaugeMetricFamily(
            "macmesh_instance_requests_in_flight",
            "admitted requests, running or queued",
            labels=labels,
        )
        queue = GaugeMetricFamily(
            "macmesh_queue_length", "admitted requests waiting for their turn", labels=labels
        )
        batch = GaugeMetricFamily(
            "macmesh_batch_size", "sequences the instance decodes together now", labels=labels
        )
        tps = GaugeMetricFamily(
            "macmesh_instance_recent_generation_tps",
            "recent decode tokens per second",
            labels=labels,
        )
        for instance in self.instances():
            info = instance.info()
            values = [info.instance_id, info.model, info.engine]
            if info.engine not in ("pipeline", "pipeline_mtp") and len(info.stages) == 1:
                # A single-node instance's batch scheduler reports its batch and queue.
                size, waiting = info.batch_size, info.queued
            else:
                size, waiting = batch_and_queue(info.instance_id, info.engine, info.in_flight)
            in_flight.add_metric(values, info.in_flight)
            batch.add_metric(values, size)
            queue.add_metric(values, waiting)
            tps.add_metric(values, info.recent_generation_tps)
        yield from (in_flight, queue, batch, tps)


def _started(daemon: Any) -> bool:
    try:
        daemon.node_id  # noqa: B018 - raises until the daemon started
    except RuntimeError:
        return False
    return True


class DaemonMetrics:
    """The daemon's registry, its request metrics, and the interceptor that feeds them."""

    def __init__(self, daemon: Any, servicer: Any) -> None:
        self.registry = CollectorRegistry()
        self.generation = GenerationMetrics(self.registry, "macmesh")
        self.relayed = Counter(
            "macmesh_relayed_requests",
            "Generate requests relayed to another coordinator",
            registry=self.registry,
        )
        self.stage_forward = Histogram(
            "macmesh_stage_forward_seconds",
            "activation in at this stage -> its sampled token back out through this stage "
            "(this stage's compute plus every later hop and stage)",
            ["instance"],
            buckets=HOP_BUCKETS,
            registry=self.registry,
        )
        self.servicer = servicer
        self.registry.register(NodeCollector(daemon, lambda: servicer.registry.all()))

    def interceptor(self) -> grpc.ServerInterceptor:
        return _MetricsInterceptor(self)

    def instance_for(self, model: str, stages: list[Any]) -> str:
        """The local instance a finished request ran on ("" when another node coordinates)."""
        nodes = [s.node_id for s in stages]
        for instance in self.servicer.registry.matching(model):
            if [s.node_id for s in instance.stages] == nodes:
                return instance.instance_id
        return ""


class Guarded:
    """A tracker whose failures are logged, never raised: metrics must not fail a request."""

    def __init__(self, tracker: RequestTracker) -> None:
        self._tracker = tracker

    def __getattr__(self, name: str) -> Callable[..., None]:
        method = getattr(self._tracker, name)

        def call(*args: Any, **kwargs: Any) -> None:
            try:
                method(*args, **kwargs)
            except Exception:
                log.exception("metrics.failed", method=name)

        return call


class _MetricsInterceptor(grpc.ServerInterceptor):
    def __init__(self, metrics: DaemonMetrics) -> None:
        self.metrics = metrics
        self.arrivals = _Arrivals()

    def intercept_service(self, continuation: Any, details: Any) -> Any:
        handler = continuation(details)
        if handler is None:
            return None
        if details.method == GENERATE_METHOD and handler.unary_stream is not None:
            inner = handler.unary_stream

            def generate(request: Any, context: Any) -> Iterator[Any]:
                return self._generate(inner, request, context)

            return grpc.unary_stream_rpc_method_handler(
                generate, handler.request_deserializer, handler.response_serializer
            )
        if details.method == FORWARD_METHOD and handler.stream_stream is not None:
            inner_ss = handler.stream_stream

            def forward(requests: Any, context: Any) -> Iterator[Any]:
                return self._forward(inner_ss, requests, context)

            return grpc.stream_stream_rpc_method_handler(
                forward, handler.request_deserializer, handler.response_serializer
            )
        return handler

    def _generate(self, inner: Any, request: Any, context: Any) -> Iterator[Any]:
        tracker = self.metrics.generation.track()
        forwarded = is_forwarded(context)
        outcome = "cancelled"
        # A request for a model this node coordinates no instance of is relayed (the final
        # stats confirm it): its tokens are timed on the coordinator, not twice.
        relayed = not forwarded and not self.metrics.servicer.registry.matching(request.model)
        try:
            for message in inner(request, context):
                if message.WhichOneof("event") == "final":
                    final = message.final
                    instance = self.metrics.instance_for(request.model, list(final.stages))
                    relayed = not instance and not forwarded
                    if not relayed:
                        tracker.final(
                            final.engine,
                            final.prompt_tokens,
                            final.generation_tokens,
                            final.proposed_draft_tokens,
                            final.accepted_draft_tokens,
                            instance,
                            final.cached_prompt_tokens,
                        )
                    outcome = final.finish_reason or "stop"
                elif not relayed:
                    tracker.tokens(len(message.delta.token_ids))
                yield message
        except GeneratorExit:  # closed by gRPC: the client left (or went after the final)
            raise
        except BaseException:
            if outcome == "cancelled":  # no final yet (after it, the client just left early)
                code = context.code()
                outcome = code.name.lower() if isinstance(code, grpc.StatusCode) else "error"
                relayed = False  # a refusal counts where it is answered (a relayed one: twice)
            raise
        finally:
            if relayed:
                self.metrics.relayed.inc()
            else:
                tracker.end(outcome)

    def _forward(self, inner: Any, requests: Iterator[Any], context: Any) -> Iterator[Any]:
        instance = dict(context.invocation_metadata() or ()).get(INSTANCE_KEY, "")
        arrivals = self.arrivals

        def incoming() -> Iterator[Any]:
            for request in requests:
                kind = request.WhichOneof("kind")
                if kind == "activation":
                    arrivals.arrived(request.request_id, instance)
                elif kind == "batch":  # a batched forward: each row's request is timed
                    for row in request.batch.rows:
                        arrivals.arrived(row.request_id, instance)
                yield request

        def observe(request_id: str) -> None:
            timed = arrivals.answered(request_id)
            if timed is not None:
                label, seconds = timed
                self.metrics.stage_forward.labels(instance=label).observe(seconds)

        for response in inner(incoming(), context):
            kind = response.WhichOneof("kind")
            if kind == "token":
                observe(response.request_id)
            elif kind == "tokens":  # a batched forward's tokens
                for batched in response.tokens.tokens:
                    observe(batched.request_id)
            elif kind in ("released", "error"):
                arrivals.answered(response.request_id)
            yield response


class _Arrivals:
    """When each request's current activation reached this node, across all its Forward
    streams: with the ring, the last stage's token leaves on the coordinator's return stream,
    not on the stream its activation came in on. Bounded: a request whose answer this node
    never sees (a middle stage: tokens skip it) is forgotten oldest-first."""

    LIMIT = 4096

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pending: OrderedDict[str, tuple[str, float]] = OrderedDict()

    def arrived(self, request_id: str, instance: str) -> None:
        with self._lock:
            if request_id not in self._pending:  # a prefill's later chunks keep the first time
                self._pending[request_id] = (instance, time.perf_counter())
                if len(self._pending) > self.LIMIT:
                    self._pending.popitem(last=False)

    def answered(self, request_id: str) -> tuple[str, float] | None:
        with self._lock:
            entry = self._pending.pop(request_id, None)
        return None if entry is None else (entry[0], time.perf_counter() - entry[1])


def install(daemon: Any, servicer: Any, port: int) -> DaemonMetrics:
    """Measure ``daemon``'s gRPC traffic and serve ``/metrics`` on ``port`` (0 picks one) at
    the daemon's ``--interface`` (every address without one). Call before ``daemon.start()``:
    the port is bound now, so a port in use fails before the node joins the cluster; the port
    bound is ``daemon.metrics_port`` (and ``metrics_port`` in the state dir's daemon.json)."""
    from node.discovery.mdns import resolve_interface

    metrics = DaemonMetrics(daemon, servicer)
    daemon.add_interceptor(metrics.interceptor())
    interface = daemon.settings.interface
    address = resolve_interface(interface) if interface else "0.0.0.0"
    server, _thread = start_http_server(port, addr=address, registry=metrics.registry)
    daemon.metrics_port = server.server_address[1]
    log.info("metrics serving", address=f"{address}:{daemon.metrics_port}")
    daemon.on_stop(lambda _daemon: server.shutdown())
    return metrics
