"""The head-sampling decision of the standard samplers (OTEL_TRACES_SAMPLER), and the W3C
``traceparent`` it reads, without the SDK: an unsampled request (99 % of them at a 1 % ratio)
then costs no SDK call at all. The SDK decides again for the requests sampled here, and agrees:
each standard sampler is a function of the parent's sampled flag and the trace id (the
specification's TraceIdRatioBased compares the id's lower 64 bits with ratio x 2^64; the SDK's
own result is checked against this one in tests/unit/gateway/test_telemetry_sampling.py).
"""

from __future__ import annotations

import re

TRACE_ID_LIMIT = (1 << 64) - 1
_MAX_LENGTH = 512  # longer ones are ignored
_TRACEPARENT = re.compile(r"^[ \t]*([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})(?:(-.*)|[ \t]*)$")


class HeadSampler:
    """``sampled(trace_id, parent_sampled)``: ``parent_sampled`` is None without a (valid) parent."""

    __slots__ = ("parent_based", "root", "bound")

    def __init__(self, name: str, ratio: float = 1.0) -> None:
        self.parent_based = name.startswith("parentbased_")
        self.root = name.removeprefix("parentbased_")  # always_on | always_off | traceidratio
        self.bound = round(ratio * (TRACE_ID_LIMIT + 1))

    def sampled(self, trace_id: int, parent_sampled: bool | None) -> bool:
        if self.parent_based and parent_sampled is not None:
            return parent_sampled
        if self.root == "traceidratio":
            return trace_id & TRACE_ID_LIMIT < self.bound
        return self.root == "always_on"


def parse_traceparent(value: str) -> tuple[int, int, int] | None:
    """(trace id, parent span id, flags) of a ``traceparent``, or None when it is not a valid one
    (then the request has no parent): the W3C Trace Context rules, as the SDK's propagator reads
    them (the same pattern; version ff, or 00 with more fields, and all-zero ids are invalid)."""
    if len(value) > _MAX_LENGTH:
        return None
    match = _TRACEPARENT.match(value)
    if match is None:
        return None
    version, trace_hex, span_hex, flags_hex, rest = match.groups()
    if version == "ff" or (version == "00" and rest):
        return None
    trace_id, span_id = int(trace_hex, 16), int(span_hex, 16)
    if not trace_id or not span_id:
        return None
    return trace_id, span_id, int(flags_hex, 16)
