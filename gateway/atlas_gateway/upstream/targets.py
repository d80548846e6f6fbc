"""Which upstream serves a model: ``ATLAS_UPSTREAM_MODELS`` (first matching glob) else
``ATLAS_UPSTREAM_URL``. Base URLs may be given with or without a trailing ``/v1``."""

from __future__ import annotations

from ..globs import first_match


def normalize_base(url: str) -> str:
    url = url.strip().rstrip("/")
    if url.endswith("/v1"):
        url = url[:-3]
    return url


class Upstreams:
    def __init__(self, default_url: str, model_map: tuple[tuple[str, str], ...] = ()) -> None:
        self.default = normalize_base(default_url)
        self.model_map = tuple((glob, normalize_base(url)) for glob, url in model_map)
        self._resolved: dict[str, str] = {}

    def base_for(self, model: str) -> str:
        base = self._resolved.get(model)
        if base is None:
            base = first_match(self.model_map, model) or self.default if self.model_map else self.default
            if len(self._resolved) > 10_000:
                self._resolved.clear()
            self._resolved[model] = base
        return base

    def all_bases(self) -> list[str]:
        """Every distinct upstream (for /v1/models)."""
        seen = [self.default]
        for _, url in self.model_map:
            if url not in seen:
                seen.append(url)
        return seen
