"""Which OTEL_* / ATLAS_USAGE_RECORDS settings turn what on, and the start-up errors for values
the gateway cannot honour (telemetry/config.py)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from atlas_gateway.telemetry import NO_TRACING, NO_USAGE_RECORDS, start_tracing, start_usage_records
from atlas_gateway.telemetry.config import TelemetryConfig, TelemetryConfigError


@pytest.mark.parametrize(
    "env, exporters",
    [
        ({}, ()),  # nothing configured: off
        ({"OTEL_SERVICE_NAME": "x", "OTEL_TRACES_SAMPLER": "always_on"}, ()),  # no exporter: still off
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318"}, ("otlp",)),
        ({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://collector:4318/v1/traces"}, ("otlp",)),
        ({"OTEL_TRACES_EXPORTER": "otlp"}, ("otlp",)),  # the SDK's default endpoint
        ({"OTEL_TRACES_EXPORTER": "console, otlp"}, ("console", "otlp")),
        ({"OTEL_TRACES_EXPORTER": "none", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318"}, ()),
        ({"OTEL_SDK_DISABLED": "true", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318"}, ()),
    ],
)
def test_tracing_is_on_only_when_an_exporter_is_configured(env, exporters):
    assert TelemetryConfig.from_env(env).trace_exporters == exporters


@pytest.mark.parametrize(
    "env, protocol",
    [
        ({}, "http/protobuf"),  # the specification's default
        ({"OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"}, "grpc"),
        (
            {"OTEL_EXPORTER_OTLP_PROTOCOL": "grpc", "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL": "http/protobuf"},
            "http/protobuf",
        ),
    ],
)
def test_protocol_per_signal_wins_over_the_general_one(env, protocol):
    config = TelemetryConfig.from_env({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4317", **env})
    assert config.trace_protocol == protocol


@pytest.mark.parametrize(
    "env, named",
    [
        ({"OTEL_TRACES_EXPORTER": "zipkin"}, "OTEL_TRACES_EXPORTER"),
        ({"OTEL_TRACES_EXPORTER": "none,otlp"}, "OTEL_TRACES_EXPORTER"),
        (
            {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c", "OTEL_EXPORTER_OTLP_PROTOCOL": "http/json"},
            "OTEL_EXPORTER_OTLP_PROTOCOL",
        ),
        (
            {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c", "OTEL_TRACES_SAMPLER": "parentbased_traceidratoi"},
            "OTEL_TRACES_SAMPLER",
        ),
        (
            {
                "OTEL_EXPORTER_OTLP_ENDPOINT": "http://c",
                "OTEL_TRACES_SAMPLER": "traceidratio",
                "OTEL_TRACES_SAMPLER_ARG": "1%",
            },
            "OTEL_TRACES_SAMPLER_ARG",
        ),
        (
            {
                "OTEL_EXPORTER_OTLP_ENDPOINT": "http://c",
                "OTEL_TRACES_SAMPLER": "traceidratio",
                "OTEL_TRACES_SAMPLER_ARG": "5",
            },
            "OTEL_TRACES_SAMPLER_ARG",
        ),
        ({"ATLAS_USAGE_RECORDS": "kafka"}, "ATLAS_USAGE_RECORDS"),
    ],
)
def test_a_value_the_gateway_cannot_honour_is_a_start_up_error_naming_it(env, named):
    """The SDK would warn and fall back (a misspelt 1 % sampler would trace everything)."""
    with pytest.raises(TelemetryConfigError, match=named):
        TelemetryConfig.from_env(env)


def test_usage_records_are_opt_in():
    assert TelemetryConfig.from_env({}).usage_records == "off"
    assert TelemetryConfig.from_env({"ATLAS_USAGE_RECORDS": "STDOUT"}).usage_records == "stdout"
    assert TelemetryConfig.from_env({"ATLAS_USAGE_RECORDS": "otlp"}).logs_protocol == "http/protobuf"
    assert (
        TelemetryConfig.from_env(
            {"ATLAS_USAGE_RECORDS": "otlp", "OTEL_EXPORTER_OTLP_LOGS_PROTOCOL": "grpc"}
        ).logs_protocol
        == "grpc"
    )
    # OTEL_SDK_DISABLED switches off what goes through the SDK, not the JSON lines
    assert TelemetryConfig.from_env({"ATLAS_USAGE_RECORDS": "otlp", "OTEL_SDK_DISABLED": "true"}).usage_records == "off"
    assert (
        TelemetryConfig.from_env({"ATLAS_USAGE_RECORDS": "stdout", "OTEL_SDK_DISABLED": "TRUE"}).usage_records
        == "stdout"
    )


def test_off_is_the_constant_no_op_and_loads_no_sdk():
    """Tracing and records off cost the hot path nothing: not even the SDK's tracer or an exporter
    is imported. (redis-py 8 imports OpenTelemetry's metrics API by itself when it is installed,
    for its own opt-in metrics: that is not the gateway's doing, and not on its hot path.)"""
    code = (
        "import sys\n"
        "from atlas_gateway.telemetry import TelemetryConfig, start_tracing, start_usage_records\n"
        "import atlas_gateway.app\n"
        "config = TelemetryConfig.from_env({})\n"
        "start_tracing(config); start_usage_records(config)\n"
        "print(sorted(m for m in sys.modules if m.startswith(('opentelemetry.sdk.trace', 'opentelemetry.sdk._logs', "
        "'opentelemetry.exporter', 'atlas_gateway.telemetry.otel_sdk', 'atlas_gateway.telemetry.usage_records'))))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
    config = TelemetryConfig.from_env({})
    assert start_tracing(config) is NO_TRACING and start_usage_records(config) is NO_USAGE_RECORDS
