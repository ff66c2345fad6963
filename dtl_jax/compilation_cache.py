"""JAX's persistent compilation cache, on by default.

Compilation is about a third of a default run's wall time on a CPU. With the cache, a second run (a new
seed, a new workdir, a sweep point, a test) loads every executable it compiled before from disk.

Where the cache lives, first match wins:

1. the config key ``compilation_cache`` (``--set compilation_cache=/path``), when not empty;
2. the environment variable ``DTL_JAX_COMPILATION_CACHE``;
3. ``$XDG_CACHE_HOME/dtl_jax/jax`` (default ``~/.cache/dtl_jax/jax``).

The value ``off`` (in the key or the variable) turns the cache off. JAX keys entries by the computation,
the compiler flags, the devices and the JAX version, so a stale entry is never used.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import jax

ENV = "DTL_JAX_COMPILATION_CACHE"
OFF = "off"
MIN_COMPILE_SECONDS = 0.1  # compilations quicker than this are not worth a file


def cache_dir(setting: str = "") -> Path | None:
    """The cache folder that ``setting`` (the config key's value) and the environment select, or None
    when the cache is off."""
    value = setting or os.environ.get(ENV, "")
    if value.strip().lower() == OFF:
        return None
    if value:
        return Path(value).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "dtl_jax" / "jax"


def enable(setting: str = "") -> Path | None:
    """Points JAX's persistent compilation cache at ``cache_dir(setting)`` (or turns it off); returns
    the folder. An unwritable folder turns the cache off with a warning rather than failing the run."""
    directory = cache_dir(setting)
    if directory is not None:
        try:
            directory.mkdir(parents=True, exist_ok=True)
            probe = directory / f".write-test-{os.getpid()}"
            probe.write_text("ok")
            probe.unlink()
        except OSError as err:
            warnings.warn(
                f"compilation cache {str(directory)!r} cannot be written ({err.strerror or err}): compiling "
                f"without it; set {ENV} or --set compilation_cache=PATH to a writable folder, or to {OFF}",
                stacklevel=2,
            )
            directory = None
    jax.config.update("jax_compilation_cache_dir", str(directory) if directory is not None else None)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", MIN_COMPILE_SECONDS)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return directory
