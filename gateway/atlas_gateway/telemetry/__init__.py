"""Traces and usage records (docs/tracing.md): one server span per request, its children and
attributes, and one usage record per settled request.

Off unless the standard OTEL_* variables name an exporter (config.py), and then the hot path
sees only constant no-ops (noop.py): no OpenTelemetry module is even imported. On, otel_sdk.py
is the one module that imports the OpenTelemetry SDK.
"""

from __future__ import annotations

from .config import TelemetryConfig, TelemetryConfigError
from .noop import NO_TRACING, NO_USAGE_RECORDS

__all__ = ["TelemetryConfig", "TelemetryConfigError", "start_tracing", "start_usage_records"]


def start_tracing(config: TelemetryConfig):
    """The process's tracer: the constant no-op unless an exporter is configured."""
    if not config.tracing:
        return NO_TRACING
    from .otel_sdk import SdkTracing

    return SdkTracing(config)


def start_usage_records(config: TelemetryConfig):
    """The process's usage-record sink: the constant no-op unless ATLAS_USAGE_RECORDS asks."""
    if config.usage_records == "stdout":
        from .usage_records import JsonLineUsageRecords

        return JsonLineUsageRecords()
    if config.usage_records == "otlp":
        from .otel_sdk import OtlpUsageRecords

        return OtlpUsageRecords(config)
    return NO_USAGE_RECORDS
