"""What the hot path holds when traces (or usage records) are off: constants whose methods do
nothing, so the request path calls them unconditionally and pays one method call each."""

from __future__ import annotations


class NoSpan:
    """A child span that is not recorded (tracing off, or the request not sampled)."""

    __slots__ = ()
    traceparent: str | None = None  # the upstream gets the client's own, if any

    def end(self, error: str | None = None) -> None:
        pass


NO_SPAN = NoSpan()


class NoTrace:
    """The trace of a request nobody records. ``trace_id`` None: the usage record (if any) takes
    the client's own trace id instead."""

    __slots__ = ()
    recording = False
    trace_id: str | None = None

    def child(self, name: str) -> NoSpan:
        return NO_SPAN

    def upstream(self, model: str) -> NoSpan:
        return NO_SPAN

    def finish(self, req) -> None:
        pass


NO_TRACE = NoTrace()


class NoTracing:
    """The tracer when tracing is off."""

    __slots__ = ()
    enabled = False

    def start(self, forward: dict[str, str], method: str, route, started: float) -> NoTrace:
        return NO_TRACE

    def shutdown(self) -> None:
        pass


NO_TRACING = NoTracing()


class NoUsageRecords:
    """The usage-record sink when records are off."""

    __slots__ = ()
    enabled = False

    def emit(self, req) -> None:
        pass

    def shutdown(self) -> None:
        pass


NO_USAGE_RECORDS = NoUsageRecords()
