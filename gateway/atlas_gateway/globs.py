"""Model allow-lists: shell-style globs (``qwen2.5-*``), compiled once per distinct list."""

from __future__ import annotations

import fnmatch
import re
from functools import lru_cache
from typing import Callable, Iterable


def _allow_all(model: str) -> bool:
    return True


@lru_cache(maxsize=4096)
def compile_globs(globs: tuple[str, ...]) -> Callable[[str], bool]:
    """A matcher for ``globs``; an empty tuple allows every model. Case-sensitive, like model ids."""
    if not globs:
        return _allow_all
    pattern = re.compile("|".join(f"(?:{fnmatch.translate(g)})" for g in globs))
    return lambda model: pattern.match(model) is not None


def first_match(pairs: Iterable[tuple[str, str]], model: str) -> str | None:
    """The value of the first (glob, value) pair whose glob matches ``model``."""
    for glob, value in pairs:
        if compile_globs((glob,))(model):
            return value
    return None
