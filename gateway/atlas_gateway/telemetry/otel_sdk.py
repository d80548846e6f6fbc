"""The one module that imports OpenTelemetry (only when config.py turned something on): the
tracer and its exporters, the per-request traces it hands the hot path, and the OTLP sink of
usage records. Everything else the SDK reads from the standard variables itself: sampler
(OTEL_TRACES_SAMPLER[_ARG]), resource (OTEL_SERVICE_NAME, OTEL_RESOURCE_ATTRIBUTES), endpoint,
headers, certificates, timeouts (OTEL_EXPORTER_OTLP_*) and batching (OTEL_BSP_*, OTEL_BLRP_*).
"""

from __future__ import annotations

import socket
from importlib import metadata
from random import getrandbits
from time import perf_counter, time_ns

from opentelemetry.sdk.resources import OTELResourceDetector, Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.sdk.trace.id_generator import RandomIdGenerator
from opentelemetry.trace import SpanKind, Status, StatusCode, TraceFlags, set_span_in_context
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from .attributes import client_trace_id, span_attributes, usage_record
from .config import TelemetryConfig
from .noop import NO_SPAN, NoSpan
from .sampling import HeadSampler, parse_traceparent

SCOPE = "atlas_gateway"
FLUSH_MILLIS = 3000  # at shutdown: what is still queued gets this long to leave


def resource() -> Resource:
    """service.name "atlas-gateway" unless OTEL_SERVICE_NAME / OTEL_RESOURCE_ATTRIBUTES say
    otherwise; host.name (the pod's name under Kubernetes) unless they set it."""
    detected = OTELResourceDetector().detect()
    defaults = {"service.name": "atlas-gateway", "host.name": socket.gethostname()}
    try:
        defaults["service.version"] = metadata.version("atlas")
    except metadata.PackageNotFoundError:
        pass
    return Resource.create(defaults).merge(detected)


def _span_exporters(config: TelemetryConfig):
    for name in config.trace_exporters:
        if name == "console":
            from opentelemetry.sdk.trace.export import ConsoleSpanExporter

            yield ConsoleSpanExporter()
        elif config.trace_protocol == "grpc":
            from opentelemetry.exporter.otlp.proto.grpc import trace_exporter as grpc_traces

            yield grpc_traces.OTLPSpanExporter()
        else:
            from opentelemetry.exporter.otlp.proto.http import trace_exporter as http_traces

            yield http_traces.OTLPSpanExporter()


class Child:
    """A recorded child span (admission, the upstream call, settlement); ``traceparent``: what
    the upstream is sent, for the upstream call's."""

    __slots__ = ("span", "traceparent")

    def __init__(self, span, traceparent: str | None = None) -> None:
        self.span = span
        self.traceparent = traceparent

    def end(self, error: str | None = None) -> None:
        if error is not None:
            self.span.set_status(Status(StatusCode.ERROR, error))
        self.span.end()


class SpanTrace:
    """A sampled request: its server span, and the children started under it."""

    __slots__ = ("tracer", "span", "operation", "context", "trace_id")
    recording = True

    def __init__(self, tracer, span, operation: str) -> None:
        self.tracer = tracer
        self.span = span
        self.operation = operation
        self.context = set_span_in_context(span)
        self.trace_id = f"{span.get_span_context().trace_id:032x}"

    def child(self, name: str) -> Child:
        return Child(self.tracer.start_span(name, self.context))

    def upstream(self, model: str) -> Child:
        """The upstream call as a client span, with the traceparent that makes the upstream's own
        spans (vLLM's) its children."""
        span = self.tracer.start_span(
            f"{self.operation} {model}",
            self.context,
            SpanKind.CLIENT,
            {"gen_ai.operation.name": self.operation, "gen_ai.request.model": model},
        )
        context = span.get_span_context()
        return Child(span, f"00-{context.trace_id:032x}-{context.span_id:016x}-{context.trace_flags:02x}")

    def finish(self, req) -> None:
        span = self.span
        span.set_attributes(span_attributes(req))
        if req.error:
            span.set_status(Status(StatusCode.ERROR, req.error))
        span.end()


class UnsampledTrace:
    """A request the sampler left out: no span object at all, but the upstream still gets a
    traceparent (sampled flag off) so that its own sampler follows the same decision. It is its
    own upstream span (nothing to end)."""

    __slots__ = ("traceparent", "trace_id")
    recording = False

    def __init__(self, trace_id: int, flags: int) -> None:
        self.trace_id = f"{trace_id:032x}"
        self.traceparent = f"00-{self.trace_id}-{getrandbits(64) or 1:016x}-{flags:02x}"

    def child(self, name: str) -> NoSpan:
        return NO_SPAN

    def upstream(self, model: str) -> "UnsampledTrace":
        return self

    def end(self, error: str | None = None) -> None:
        pass

    def finish(self, req) -> None:
        pass


class _DecidedTraceIds(RandomIdGenerator):
    """A sampled root span takes the trace id sampling.py decided on (SdkTracing.start)."""

    decided = 0

    def generate_trace_id(self) -> int:
        trace_id, self.decided = self.decided, 0
        return trace_id or super().generate_trace_id()


class SdkTracing:
    """The tracer of one gateway process."""

    enabled = True

    def __init__(self, config: TelemetryConfig) -> None:
        self.ids = _DecidedTraceIds()
        # the sampler: OTEL_TRACES_SAMPLER[_ARG], read by the SDK
        self.provider = TracerProvider(resource=resource(), id_generator=self.ids)
        for exporter in _span_exporters(config):
            self.provider.add_span_processor(BatchSpanProcessor(exporter))
        self.tracer = self.provider.get_tracer(SCOPE)
        self.head = HeadSampler(config.sampler, config.sampler_ratio)
        self.propagator = TraceContextTextMapPropagator()

    def start(self, forward: dict[str, str], method: str, route, started: float):
        """The request's trace, its server span started when the request arrived (``started``:
        its perf_counter()); the parent is the client's ``traceparent`` when it sent a valid one.
        An unsampled request gets no SDK call at all (sampling.py)."""
        header = forward.get("traceparent")
        parent = parse_traceparent(header) if header is not None else None
        if parent is None:
            trace_id, parent_sampled, random_bit = getrandbits(128) or 1, None, TraceFlags.RANDOM_TRACE_ID
        else:
            trace_id, _, flags = parent
            parent_sampled, random_bit = bool(flags & TraceFlags.SAMPLED), flags & TraceFlags.RANDOM_TRACE_ID
        if not self.head.sampled(trace_id, parent_sampled):
            return UnsampledTrace(trace_id, random_bit)
        self.ids.decided = trace_id if parent is None else 0
        start_ns = time_ns() - int((perf_counter() - started) * 1e9)
        span = self.tracer.start_span(
            f"{method} {route.path}",
            self.propagator.extract(forward) if parent else None,
            SpanKind.SERVER,
            start_time=start_ns,
        )
        return SpanTrace(self.tracer, span, route.operation)

    def shutdown(self) -> None:
        self.provider.force_flush(FLUSH_MILLIS)
        self.provider.shutdown()


class OtlpUsageRecords:
    """Usage records as OTLP log records (event ``atlas.usage``, the record's fields as
    attributes, linked to the request's span) to the endpoint OTEL_EXPORTER_OTLP_[LOGS_]* names."""

    enabled = True

    def __init__(self, config: TelemetryConfig) -> None:
        from opentelemetry.sdk._logs import LoggerProvider
        from opentelemetry.sdk._logs.export import BatchLogRecordProcessor

        if config.logs_protocol == "grpc":
            from opentelemetry.exporter.otlp.proto.grpc import _log_exporter as log_exporter
        else:
            from opentelemetry.exporter.otlp.proto.http import _log_exporter as log_exporter  # type: ignore[no-redef]
        self.provider = LoggerProvider(resource=resource())
        self.provider.add_log_record_processor(BatchLogRecordProcessor(log_exporter.OTLPLogExporter()))
        self.logger = self.provider.get_logger(SCOPE)

    def emit(self, req) -> None:
        trace = req.trace
        record = usage_record(req, trace.trace_id or client_trace_id(req.forward))
        attributes = {f"atlas.usage.{name}": value for name, value in record.items() if value is not None}
        self.logger.emit(
            event_name="atlas.usage",
            body="usage",
            attributes=attributes,
            context=trace.context if trace.recording else None,
        )

    def shutdown(self) -> None:
        self.provider.force_flush(FLUSH_MILLIS)
        self.provider.shutdown()
