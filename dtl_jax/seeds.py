"""Independent random streams, one per purpose (docs/methods.md §3).

A run's ``seed`` is expanded with ``numpy.random.SeedSequence([seed, purpose_id, *index])`` into one
integer seed per purpose (a data split, a stage's initialisation, a stage's batch order, an attacker's
draw, ...). ``purpose_id`` is a fixed function of the purpose's name (CRC-32), so:

- seed ``s`` and seed ``s + 1`` share no stream (``SeedSequence`` hashes its whole entropy list; nothing
  is derived as ``seed + offset``);
- two purposes never share a stream, and adding a purpose (a new method, a new stage) moves no other
  purpose's draws.

>>> derive(0, "source-split") == derive(0, "source-split")
True
>>> len({derive(0, "source-split"), derive(1, "source-split"), derive(0, "target-split")})
3
"""

from __future__ import annotations

import zlib

import numpy as np


def purpose_id(purpose: str) -> int:
    """The fixed id of a purpose: CRC-32 of its name."""
    return zlib.crc32(purpose.encode())


def derive(seed: int, purpose: str, *index: int) -> int:
    """A 32-bit seed for ``purpose`` (and optional integer sub-indices, e.g. a budget and a draw)."""
    entropy = [int(seed), purpose_id(purpose), *(int(i) for i in index)]
    return int(np.random.SeedSequence(entropy).generate_state(1)[0])


def rng(seed: int, purpose: str, *index: int) -> np.random.Generator:
    """A numpy generator on ``purpose``'s stream."""
    return np.random.default_rng(derive(seed, purpose, *index))


def key(seed: int, purpose: str, *index: int):
    """A JAX PRNG key on ``purpose``'s stream."""
    import jax

    return jax.random.PRNGKey(derive(seed, purpose, *index))
