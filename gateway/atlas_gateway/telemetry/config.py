"""What the environment asks for: traces (the standard OpenTelemetry variables only) and usage
records (``ATLAS_USAGE_RECORDS``). Pure: reads a mapping, imports no OpenTelemetry module.

Traces are on when ``OTEL_TRACES_EXPORTER`` names an exporter (``otlp``, ``console``), or when it
is unset and an OTLP endpoint is (``OTEL_EXPORTER_OTLP_ENDPOINT`` or
``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT``): the specification's default exporter is ``otlp``, but
exporting to localhost:4318 because nothing was configured would make every gateway without a
collector retry a dead port; an endpoint is what says a collector exists. ``none`` and
``OTEL_SDK_DISABLED=true`` turn everything off. The sampler, the resource, the endpoint's
details, headers, timeouts and batching are the SDK's to read from the same variables.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

TRACE_EXPORTERS = ("otlp", "console")
PROTOCOLS = ("http/protobuf", "grpc")  # http/json: the Python SDK has no such exporter
USAGE_RECORDS = ("off", "stdout", "otlp")
SAMPLERS = (
    "always_on",
    "always_off",
    "traceidratio",
    "parentbased_always_on",
    "parentbased_always_off",
    "parentbased_traceidratio",
)


class TelemetryConfigError(ValueError):
    """An OTEL_* or ATLAS_USAGE_RECORDS value the gateway cannot honour: it refuses to start."""


@dataclass(frozen=True)
class TelemetryConfig:
    trace_exporters: tuple[str, ...] = ()  # empty: tracing off
    trace_protocol: str = "http/protobuf"
    usage_records: str = "off"  # off | stdout (JSON lines) | otlp (log records)
    logs_protocol: str = "http/protobuf"
    sampler: str = "parentbased_always_on"  # OTEL_TRACES_SAMPLER (the SDK reads it too)
    sampler_ratio: float = 1.0  # OTEL_TRACES_SAMPLER_ARG of the ratio samplers

    @property
    def tracing(self) -> bool:
        return bool(self.trace_exporters)

    @property
    def active(self) -> bool:
        return self.tracing or self.usage_records != "off"

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> "TelemetryConfig":
        # the specification's booleans: only "true" (any case) is true
        disabled = (env.get("OTEL_SDK_DISABLED") or "").strip().lower() == "true"
        usage = (env.get("ATLAS_USAGE_RECORDS") or "off").strip().lower()
        if usage in ("none", "false", "0", "no"):
            usage = "off"
        if usage not in USAGE_RECORDS:
            raise TelemetryConfigError(
                f"ATLAS_USAGE_RECORDS={env['ATLAS_USAGE_RECORDS']!r}: expected one of {', '.join(USAGE_RECORDS)}"
            )
        if disabled:
            return cls(usage_records="off" if usage == "otlp" else usage)
        exporters = _trace_exporters(env)
        sampler, ratio = _sampler(env) if exporters else ("parentbased_always_on", 1.0)
        return cls(
            trace_exporters=exporters,
            sampler=sampler,
            sampler_ratio=ratio,
            trace_protocol=_protocol(env, "TRACES") if "otlp" in exporters else "http/protobuf",
            usage_records=usage,
            logs_protocol=_protocol(env, "LOGS") if usage == "otlp" else "http/protobuf",
        )


def _trace_exporters(env: Mapping[str, str]) -> tuple[str, ...]:
    raw = env.get("OTEL_TRACES_EXPORTER")
    if raw is None or not raw.strip():
        endpoint = env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or env.get("OTEL_EXPORTER_OTLP_ENDPOINT")
        return ("otlp",) if endpoint and endpoint.strip() else ()
    names = tuple(dict.fromkeys(n.strip().lower() for n in raw.split(",") if n.strip()))
    if "none" in names:
        if len(names) > 1:
            raise TelemetryConfigError(f"OTEL_TRACES_EXPORTER={raw!r}: 'none' cannot be combined with others")
        return ()
    unknown = [n for n in names if n not in TRACE_EXPORTERS]
    if unknown:
        raise TelemetryConfigError(
            f"OTEL_TRACES_EXPORTER={raw!r}: unknown exporter {unknown[0]!r} "
            f"(this gateway has {', '.join(TRACE_EXPORTERS)}, none)"
        )
    return names


def _protocol(env: Mapping[str, str], signal: str) -> str:
    name = f"OTEL_EXPORTER_OTLP_{signal}_PROTOCOL"
    raw = env.get(name)
    if raw is None or not raw.strip():
        name, raw = "OTEL_EXPORTER_OTLP_PROTOCOL", env.get("OTEL_EXPORTER_OTLP_PROTOCOL")
    protocol = (raw or "http/protobuf").strip().lower()
    if protocol not in PROTOCOLS:
        raise TelemetryConfigError(f"{name}={raw!r}: expected one of {', '.join(PROTOCOLS)}")
    return protocol


def _sampler(env: Mapping[str, str]) -> tuple[str, float]:
    """(sampler, ratio). The SDK would log a warning and sample everything: a typo must not
    cost 100 % tracing."""
    raw = env.get("OTEL_TRACES_SAMPLER")
    sampler = (raw or "parentbased_always_on").strip().lower()
    if sampler not in SAMPLERS:
        raise TelemetryConfigError(f"OTEL_TRACES_SAMPLER={raw!r}: expected one of {', '.join(SAMPLERS)}")
    arg = env.get("OTEL_TRACES_SAMPLER_ARG")
    ratio = 1.0  # the SDK's default without an argument
    if sampler.endswith("traceidratio") and arg is not None and arg.strip():
        try:
            ratio = float(arg)
        except ValueError:
            ratio = -1.0
        if not 0.0 <= ratio <= 1.0:
            raise TelemetryConfigError(f"OTEL_TRACES_SAMPLER_ARG={arg!r}: expected a ratio from 0 to 1")
    return sampler, ratio
