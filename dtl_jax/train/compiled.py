"""A cache of jitted functions shared by the seeds (and sweep points) of one process."""

from __future__ import annotations

from collections.abc import Callable


class Compiled:
    """Jitted functions built once per key. A key is a tuple of the config values and objects that shape
    the function's program (never object identities, never values that are only arguments of it, such as
    a loss weight λ): one ``Compiled`` shared by every seed of a multi-seed run, or every point of a sweep,
    builds each function once, and the function's own ``jax.jit`` cache then compiles it once per shape."""

    def __init__(self):
        self._functions: dict = {}

    def get(self, key: tuple, build: Callable):
        """The function under ``key``, built by ``build()`` the first time."""
        if key not in self._functions:
            self._functions[key] = build()
        return self._functions[key]

    def keys(self) -> list[tuple]:
        return list(self._functions)
