"""The gateway's own head-sampling decision (telemetry/sampling.py) is the SDK's: for every
standard sampler, parent and trace id, and the traceparent parser reads what the SDK's W3C
propagator reads (Hypothesis properties against the SDK itself)."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st
from opentelemetry.sdk.trace import sampling
from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags, get_current_span, set_span_in_context
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from atlas_gateway.telemetry.config import SAMPLERS
from atlas_gateway.telemetry.sampling import HeadSampler, parse_traceparent

SDK_SAMPLERS = {
    "always_on": lambda r: sampling.ALWAYS_ON,
    "always_off": lambda r: sampling.ALWAYS_OFF,
    "traceidratio": sampling.TraceIdRatioBased,
    "parentbased_always_on": lambda r: sampling.ParentBased(sampling.ALWAYS_ON),
    "parentbased_always_off": lambda r: sampling.ParentBased(sampling.ALWAYS_OFF),
    "parentbased_traceidratio": lambda r: sampling.ParentBased(sampling.TraceIdRatioBased(r)),
}


def test_every_sampler_the_config_accepts_is_covered():
    assert set(SDK_SAMPLERS) == set(SAMPLERS)


@settings(max_examples=400)
@given(
    name=st.sampled_from(sorted(SDK_SAMPLERS)),
    ratio=st.floats(0, 1),
    trace_id=st.integers(1, 2**128 - 1),
    parent=st.none() | st.booleans(),
)
def test_the_decision_is_the_sdks(name, ratio, trace_id, parent):
    context = None
    if parent is not None:
        flags = TraceFlags(TraceFlags.SAMPLED if parent else TraceFlags.DEFAULT)
        context = set_span_in_context(
            NonRecordingSpan(SpanContext(trace_id, 0x1234, is_remote=True, trace_flags=flags))
        )
    sdk = SDK_SAMPLERS[name](ratio).should_sample(context, trace_id, "POST /v1/chat/completions")
    assert HeadSampler(name, ratio).sampled(trace_id, parent) == sdk.decision.is_sampled()


_hex = st.text("0123456789abcdef", min_size=1, max_size=40)
_headers = st.one_of(
    st.builds(
        lambda v, t, s, f, rest: f"{v}-{t}-{s}-{f}{rest}",
        st.sampled_from(["00", "01", "ff", "0G", "cc"]),
        st.sampled_from(["0" * 32, "4bf92f3577b34da6a3ce929d0e0e4736", "4BF92F3577B34DA6A3CE929D0E0E4736"]),
        st.sampled_from(["0" * 16, "00f067aa0ba902b7", "00f067aa0ba902b"]),
        st.sampled_from(["00", "01", "03", "zz"]),
        st.sampled_from(["", "-x", " ", "\t", "-", "x"]),
    ),
    st.text(max_size=80),
    _hex,
)


@settings(max_examples=400)
@given(header=_headers)
def test_the_traceparent_is_read_as_the_propagator_reads_it(header):
    context = get_current_span(TraceContextTextMapPropagator().extract({"traceparent": header})).get_span_context()
    ours = parse_traceparent(header)
    if context.is_valid:
        assert ours == (context.trace_id, context.span_id, int(context.trace_flags))
    else:
        assert ours is None
