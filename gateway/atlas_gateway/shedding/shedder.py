"""Load shedding by priority class (priority.py), before admission: a shed request consumes
nothing and costs no Redis round trip. Classes are shed from the bottom (Sheddable, then
Standard, Critical last), by the first of these that applies:

1. the upstream pool, always: a process sheds every class once its own in-flight requests fill
   ``ATLAS_UPSTREAM_POOL_SIZE`` (beyond it a request would only wait for a connection into a 504);
2. the upstream's own queue, when its load could be read lately (upstream_load.py): a class is
   shed while ``vllm:num_requests_waiting`` is at or above its threshold for that upstream;
3. otherwise, the in-flight ceilings ``ATLAS_SHED_THRESHOLD``, ``_STANDARD``, ``_CRITICAL``:
   the fallback for an upstream that exports nothing.

Two kinds of in-flight ceiling (settings.py):

* *local* limits count this process's requests: the defaults (1/2, 3/4 and all of the upstream
  pool, which is per process: a request beyond the pool would only wait for a pooled connection
  into a 504), the pool itself, and every threshold when ``ATLAS_SHED_SCOPE=process``;
* *shared* limits (thresholds set with ``ATLAS_SHED_SCOPE=cluster``, the default) count the
  requests of every gateway process on this Redis: this process's own, live, plus the others'
  as they last published them (load_view.py). When that view is stale (Redis unreachable), a
  shared limit falls back to this process's share of it: its own count times the number of
  processes it last saw.
"""

from __future__ import annotations

from .upstream_load import UpstreamQueue


class Shedder:
    """Counts this process's in-flight upstream requests and decides what to shed.

    Requests between the shedding decision and the upstream call (their admission is awaiting
    Redis) count too: otherwise a burst would pass the check all at once, before any of it is
    in flight, and overrun the upstream pool the thresholds are derived from."""

    __slots__ = ("inflight", "admitting", "pool", "limits", "shared", "others", "scale")

    def __init__(
        self, sheddable: int, standard: int, critical: int, shared: tuple[int, int, int] = (0, 0, 0), pool: int = 0
    ) -> None:
        self.inflight = 0
        self.admitting = 0
        self.pool = pool  # every class is shed at this many of this process's requests; 0: none
        # a class is shed once the count reaches its limit; <= 0: no such limit
        self.limits = {"Sheddable": sheddable, "Standard": standard, "Critical": critical}
        self.shared = dict(zip(("Sheddable", "Standard", "Critical"), shared))
        # the cluster-wide view (load_view.py): the other processes' in-flight requests, and what
        # this process's own count is multiplied by (1 with a fresh view; the number of processes
        # last seen when the view is stale)
        self.others = 0
        self.scale = 1

    @property
    def mine(self) -> int:
        return self.inflight + self.admitting

    def should_shed(self, priority: str, queue: UpstreamQueue | None = None) -> bool:
        """``queue``: the last reading of the request's upstream, if its load is read."""
        mine = self.inflight + self.admitting
        if 0 < self.pool <= mine:
            return True
        if queue is not None and queue.fresh:
            return queue.sheds(priority)
        limit = self.limits[priority]
        if 0 < limit <= mine:
            return True
        shared = self.shared[priority]
        return 0 < shared <= mine * self.scale + self.others
