"""Usage records as JSON lines on stdout (``ATLAS_USAGE_RECORDS=stdout``)."""

from __future__ import annotations

import os

import orjson

from .attributes import client_trace_id, usage_record


class JsonLineUsageRecords:
    """One JSON object per line on stdout. One write(2) per record: lines shorter than a pipe's
    atomic size (4 KiB; a record is ~400 bytes) never interleave, even with several workers
    sharing the container's stdout."""

    enabled = True

    def __init__(self, fd: int = 1) -> None:
        self.fd = fd

    def emit(self, req) -> None:
        trace = req.trace
        record = usage_record(req, trace.trace_id or client_trace_id(req.forward))
        os.write(self.fd, orjson.dumps(record) + b"\n")

    def shutdown(self) -> None:
        pass
