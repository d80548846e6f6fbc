"""Tables printed the way `kubectl get` prints them: upper-case headers, columns left-aligned and
three spaces apart, ``<none>`` for a missing value."""

from __future__ import annotations

from typing import Any, Iterable, Sequence

NONE = "<none>"


def render(headers: Sequence[str], rows: Iterable[Sequence[Any]], no_headers: bool = False) -> str:
    cells = [[NONE if v is None else str(v) for v in row] for row in rows]
    table = cells if no_headers else [list(headers), *cells]
    if not table:
        return ""
    widths = [max(len(line[i]) for line in table) for i in range(len(headers))]
    return "\n".join("   ".join(v.ljust(w) for v, w in zip(line, widths)).rstrip() for line in table)
