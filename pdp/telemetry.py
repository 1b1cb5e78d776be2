"""OpenTelemetry metrics and traces, configured by the standard ``OTEL_*`` variables.

Off unless asked for (``OTEL_METRICS_EXPORTER`` / ``OTEL_TRACES_EXPORTER`` =
``otlp``, ``prometheus`` (metrics), ``console``; default ``none``). The hot path
pays for one deque append and one dict increment per decision: durations reach
the SDK's histogram from a thread of their own, and decision counts, cache
counts, policy and database gauges are read by callbacks when the exporter collects.

Exporters are optional extras: ``pdp[otlp]``, ``pdp[prometheus]``.
"""

from __future__ import annotations

import importlib
import os
import threading
import time
from collections import Counter, deque
from collections.abc import Iterable, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any

from opentelemetry import metrics, trace
from opentelemetry.metrics import CallbackOptions, Observation
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import MetricReader, PeriodicExportingMetricReader
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter

from pdp import __version__
from pdp.errors import PdpError
from pdp.model import Decision, Location
from pdp.state import Active, PolicyHolder

__all__ = [
    "DURATION_BUCKETS",
    "Telemetry",
    "TelemetryError",
    "backdated_span",
    "configure_from_environment",
    "exporter_names",
    "server_span",
    "wanted",
]

# Seconds; a warm Check is tens of microseconds of server time, so resolve those.
DURATION_BUCKETS = (
    0.000025, 0.00005, 0.0001, 0.00015, 0.0002, 0.0003, 0.0005, 0.00075,
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0,
)  # fmt: skip


class TelemetryError(PdpError):
    """An exporter was asked for but is not installed, or is misconfigured."""


@dataclass
class Telemetry:
    """The instruments, bound to the holder they describe."""

    holder: PolicyHolder
    meter_provider: metrics.MeterProvider
    tracer: trace.Tracer | None = None
    shutdown_hooks: list[Any] = field(default_factory=list)

    def __post_init__(self) -> None:
        meter = self.meter_provider.get_meter("pdp", __version__)
        self._duration = meter.create_histogram(
            "pdp.check.duration",
            unit="s",
            description="server time of one Check or CheckBatch call",
            explicit_bucket_boundaries_advisory=DURATION_BUCKETS,
        )
        self._duration_attributes = {
            (rpc, verdict): {"rpc": rpc, "verdict": verdict}
            for rpc in ("Check", "CheckBatch")
            for verdict in ("ALLOW", "DENY", "MIXED", "ERROR")
        }
        self._durations: deque[tuple[dict[str, str], float]] = deque()
        self._stopping = threading.Event()
        self._recorder = threading.Thread(target=self._record_loop, name="pdp-telemetry", daemon=True)
        self._recorder.start()
        self._counts: Counter[tuple[str, str, str, str]] = Counter()
        self._lock = threading.Lock()
        observed = (
            (
                "counter",
                "pdp.decisions",
                "",
                self._observe_decisions,
                "decisions per verdict, rule, mode, jurisdiction",
            ),
            ("counter", "pdp.geoip.cache", "", self._observe_cache, "location cache lookups, per result"),
            (
                "counter",
                "pdp.geoip.lookup_errors",
                "",
                self._observe_lookup_errors,
                "database lookups that met a broken record, answered as location unknown (among the misses)",
            ),
            ("gauge", "pdp.policy.version", "", self._observe_version, "version of the active policy"),
            ("gauge", "pdp.policy.age_seconds", "s", self._observe_age, "time since the active policy was activated"),
            ("gauge", "pdp.geoip.build_epoch", "s", self._observe_build, "build time of the GeoIP database"),
            ("counter", "pdp.policy.reloads", "", self._observe_reloads, "snapshot fetches, per source and result"),
        )
        for kind, name, unit, callback, description in observed:
            create = meter.create_observable_counter if kind == "counter" else meter.create_observable_gauge
            create(name, callbacks=[callback], unit=unit, description=description)

    # ------------------------------------------------------------------ hot path

    def observe(
        self,
        rpc: str,
        seconds: float,
        verdict: str,
        decisions: Sequence[Decision],
        locations: Sequence[Location],
        active: Active,
    ) -> None:
        """Record one call: its duration and every decision it made (``decisions[n]``
        at ``locations[n]``)."""
        self._durations.append((self._attributes(rpc, verdict), seconds))
        by_id = active.policy.by_id
        with self._lock:
            counts = self._counts
            for decision, location in zip(decisions, locations, strict=True):
                country = location.country or "unknown"
                counts[(decision.verdict.name, decision.rule_id, "enforce", country)] += 1
                for shadow_id in decision.shadow_rule_ids:
                    counts[(by_id[shadow_id].effect.name, shadow_id, "shadow", country)] += 1

    def observe_error(self, rpc: str, seconds: float, error: Exception | None = None) -> None:
        """Record a failed call; ``error``, raised inside its span (see :func:`server_span`),
        marks that span as failed, naming the error's type."""
        self._durations.append((self._attributes(rpc, "ERROR"), seconds))
        if error is not None and self.tracer is not None:
            span = trace.get_current_span()
            span.set_attribute("error.type", type(error).__name__)
            span.set_status(trace.StatusCode.ERROR)

    def _attributes(self, rpc: str, verdict: str) -> dict[str, str]:
        """The duration's attributes, made once per (rpc, verdict): an adapter
        names its own ``rpc`` (see pdp.decisions.Endpoint)."""
        attributes = self._duration_attributes.get((rpc, verdict))
        if attributes is None:
            attributes = self._duration_attributes.setdefault((rpc, verdict), {"rpc": rpc, "verdict": verdict})
        return attributes

    def _record_durations(self) -> None:
        """Hand the queued durations to the SDK's histogram.

        A record costs several microseconds of SDK Python, so the request path only
        appends to a deque; this runs every 50 ms on a thread of its own, and before
        every collection, so an export always sees every call made before it.
        """
        durations, record = self._durations, self._duration.record
        while durations:
            attributes, seconds = durations.popleft()
            record(seconds, attributes)

    def _record_loop(self) -> None:
        while not self._stopping.wait(0.05):
            self._record_durations()

    # ------------------------------------------------------------------ callbacks

    def _observe_decisions(self, options: CallbackOptions) -> Iterable[Observation]:
        self._record_durations()  # asynchronous callbacks run before the histogram is collected
        with self._lock:
            snapshot = list(self._counts.items())
        for (verdict, rule_id, mode, jurisdiction), count in snapshot:
            yield Observation(
                count, {"verdict": verdict, "rule_id": rule_id, "mode": mode, "jurisdiction": jurisdiction}
            )

    def _observe_cache(self, options: CallbackOptions) -> Iterable[Observation]:
        active = self.holder.active
        if active is not None:
            yield Observation(active.geo.hits, {"result": "hit"})
            yield Observation(active.geo.misses, {"result": "miss"})

    def _observe_lookup_errors(self, options: CallbackOptions) -> Iterable[Observation]:
        active = self.holder.active
        if active is not None:
            yield Observation(active.geo.lookup_errors)

    def _observe_version(self, options: CallbackOptions) -> Iterable[Observation]:
        if self.holder.active is not None:
            yield Observation(self.holder.active.policy.version)

    def _observe_age(self, options: CallbackOptions) -> Iterable[Observation]:
        if self.holder.active is not None:
            yield Observation(time.time() - self.holder.active.activated_at)

    def _observe_build(self, options: CallbackOptions) -> Iterable[Observation]:
        if self.holder.active is not None:
            yield Observation(self.holder.active.geo.build_epoch)

    def _observe_reloads(self, options: CallbackOptions) -> Iterable[Observation]:
        status = self.holder.status
        active = self.holder.active
        source = _scheme(status.source or (active.source if active is not None else ""))
        for result, count in (
            ("activated", status.activations),
            ("rejected", status.rejections),
            ("error", status.fetch_errors),
            ("geoip_reloaded", status.geoip_reloads),
            ("geoip_rejected", status.geoip_rejections),
        ):
            yield Observation(count, {"source": source, "result": result})

    def shutdown(self) -> None:
        self._stopping.set()
        self._recorder.join(timeout=5)
        self._record_durations()
        for hook in self.shutdown_hooks:
            hook()


def server_span(tracer: trace.Tracer, name: str) -> AbstractContextManager[trace.Span]:
    """A server span for one call, which records no exception of its own: the
    SDK's record would hold the message, which quotes the request (a refused
    address); :meth:`Telemetry.observe_error` says the kind of error instead."""
    return tracer.start_as_current_span(
        name, kind=trace.SpanKind.SERVER, record_exception=False, set_status_on_exception=False
    )


def backdated_span(
    tracer: trace.Tracer | None, name: str, began: int, attributes: dict[str, str | int] | None = None
) -> trace.Span:
    """A server span begun at ``began`` (ns since the epoch), not made current: for a call
    whose span is known to be wanted only once it has decided (see DecisionPath.check_batch)."""
    assert tracer is not None
    return tracer.start_span(name, kind=trace.SpanKind.SERVER, attributes=attributes, start_time=began)


def _scheme(url: str) -> str:
    return url.split("://", 1)[0] if "://" in url else "none"


# --------------------------------------------------------------------------- configuration


def _load(module: str, name: str, extra: str) -> Any:
    try:
        return getattr(importlib.import_module(module), name)
    except ImportError as error:
        if "opentelemetry.proto" in str(error):
            # xds-protos, installed after opentelemetry-proto, overwrote its files (grpc/grpc#42926).
            raise TelemetryError(
                f"the {extra} exporter cannot be imported ({error}): another package overwrote "
                "opentelemetry-proto's files; pip install --force-reinstall --no-deps opentelemetry-proto"
            ) from None
        raise TelemetryError(f"the {extra} exporter is not installed: pip install 'pdp[{extra}]'") from None


def _otlp_protocol(signal: str, environ: Mapping[str, str]) -> str:
    return environ.get(f"OTEL_EXPORTER_OTLP_{signal}_PROTOCOL") or environ.get("OTEL_EXPORTER_OTLP_PROTOCOL") or "grpc"


def _metric_reader(name: str, environ: Mapping[str, str]) -> tuple[MetricReader, list[Any], str]:
    if name == "prometheus":
        reader_class = _load("opentelemetry.exporter.prometheus", "PrometheusMetricReader", "prometheus")
        start_http_server = _load("prometheus_client", "start_http_server", "prometheus")
        registry = _load("prometheus_client", "CollectorRegistry", "prometheus")()
        host = environ.get("OTEL_EXPORTER_PROMETHEUS_HOST") or "127.0.0.1"
        port = int(environ.get("OTEL_EXPORTER_PROMETHEUS_PORT") or 9464)
        # Scope labels on every series only add cardinality here: one scope, one service.
        reader = reader_class(registry=registry, scope_info_enabled=False)
        try:
            server, thread = start_http_server(port, addr=host, registry=registry)
        except OSError as error:
            raise TelemetryError(f"Prometheus endpoint {host}:{port}: {error.strerror or error}") from None
        bound = server.server_address[1]

        def stop() -> None:
            server.shutdown()
            server.server_close()
            thread.join(timeout=5)

        return reader, [stop], f"http://{host}:{bound}/metrics"
    if name == "otlp":
        if _otlp_protocol("METRICS", environ) == "grpc":
            exporter = _load("opentelemetry.exporter.otlp.proto.grpc.metric_exporter", "OTLPMetricExporter", "otlp")
        else:
            exporter = _load("opentelemetry.exporter.otlp.proto.http.metric_exporter", "OTLPMetricExporter", "otlp")
        return PeriodicExportingMetricReader(exporter()), [], "otlp"
    if name == "console":
        from opentelemetry.sdk.metrics.export import ConsoleMetricExporter

        return PeriodicExportingMetricReader(ConsoleMetricExporter()), [], "console"
    raise TelemetryError(f"OTEL_METRICS_EXPORTER={name!r}: use none, otlp, prometheus or console")


def _span_exporter(name: str, environ: Mapping[str, str]) -> SpanExporter:
    if name == "otlp":
        if _otlp_protocol("TRACES", environ) == "grpc":
            exporter = _load("opentelemetry.exporter.otlp.proto.grpc.trace_exporter", "OTLPSpanExporter", "otlp")
        else:
            exporter = _load("opentelemetry.exporter.otlp.proto.http.trace_exporter", "OTLPSpanExporter", "otlp")
        span_exporter: SpanExporter = exporter()
        return span_exporter
    if name == "console":
        from opentelemetry.sdk.trace.export import ConsoleSpanExporter

        return ConsoleSpanExporter()
    raise TelemetryError(f"OTEL_TRACES_EXPORTER={name!r}: use none, otlp or console")


def exporter_names(environ: Mapping[str, str]) -> tuple[str, str]:
    """The metrics and traces exporters the OTEL_* variables ask for, in lower case;
    ``("none", "none")`` when ``OTEL_SDK_DISABLED=true``."""
    if environ.get("OTEL_SDK_DISABLED", "").lower() == "true":
        return "none", "none"
    metrics, traces = (
        (environ.get(name) or "none").lower() for name in ("OTEL_METRICS_EXPORTER", "OTEL_TRACES_EXPORTER")
    )
    return metrics, traces


def wanted(environ: Mapping[str, str]) -> bool:
    """Whether the OTEL_* variables ask for any exporter."""
    return exporter_names(environ) != ("none", "none")


def configure_from_environment(
    holder: PolicyHolder, environ: Mapping[str, str] | None = None
) -> tuple[Telemetry | None, list[str]]:
    """Telemetry as the ``OTEL_*`` variables ask, or None when all is off.

    Returns the telemetry and a description of each exporter, for the log.

    :raises TelemetryError: an unknown exporter name, a missing extra, a busy port.
    """
    environ = os.environ if environ is None else environ
    metrics_name, traces_name = exporter_names(environ)
    if metrics_name == "none" and traces_name == "none":
        return None, []
    resource = Resource.create(
        {"service.name": environ.get("OTEL_SERVICE_NAME") or "pdp", "service.version": __version__}
    )
    described: list[str] = []
    hooks: list[Any] = []
    readers: list[MetricReader] = []
    if metrics_name != "none":
        reader, stops, where = _metric_reader(metrics_name, environ)
        readers.append(reader)
        hooks.extend(stops)
        described.append(f"metrics: {where}")
    meter_provider = MeterProvider(resource=resource, metric_readers=readers)
    hooks.append(meter_provider.shutdown)
    tracer = None
    if traces_name != "none":
        tracer_provider = TracerProvider(resource=resource)
        tracer_provider.add_span_processor(BatchSpanProcessor(_span_exporter(traces_name, environ)))
        trace.set_tracer_provider(tracer_provider)
        tracer = tracer_provider.get_tracer("pdp", __version__)
        hooks.append(tracer_provider.shutdown)
        described.append(f"traces: {traces_name}")
    return Telemetry(holder, meter_provider, tracer, hooks), described
