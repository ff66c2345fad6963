"""XLA:CPU's convolution path, chosen by measurement once per processor model and jaxlib version.

XLA:CPU runs a convolution either through YNNPACK (its default in jaxlib 0.10) or through Eigen's
convolutions (``XLA_FLAGS=--xla_cpu_experimental_ynn_fusion_type=-individual_convolution``). Which is
faster depends on the processor (docs/benchmarks.md has the figures measured here). So the library
measures, once, and remembers:

1. ``measure()`` times one small conv net's gradient step (``PROBE``: three stages of two 3x3
   convolutions, widths 16/32/64, batch 64, 32x32x3) under each path, each in a subprocess of its own
   (the flag must be set before JAX's CPU backend starts), taking the fastest of a few repeats.
2. The result is cached in ``$XDG_CACHE_HOME/dtl_jax/cpu_conv.json`` (default ``~/.cache``; beside the
   compilation cache), keyed by processor model, CPU count and jaxlib version, so a second process reads
   it instead of measuring (delete the file to measure again).
3. ``choose()`` (called when ``dtl_jax`` is imported, and by the CLI) appends the chosen path's flag to
   ``XLA_FLAGS`` before the backend starts. Eigen is chosen only when it is at least ``MARGIN`` faster;
   otherwise XLA's default is left alone.

What overrides the measurement, first match wins:

- a convolution-path flag already in the user's ``XLA_FLAGS``: never touched (``source="xla_flags"``);
- ``DTL_JAX_CPU_CONV=off``: ``XLA_FLAGS`` is left untouched (nothing measured); ``eigen`` or ``ynn``
  forces that path; ``auto`` (or unset) measures;
- a machine whose JAX has an accelerator plugin (CUDA, ROCm, TPU) or ``JAX_PLATFORMS`` without ``cpu``:
  nothing is measured or set (``source="accelerator"``);
- a CPU backend that is already running: the choice cannot take effect in this process; it is logged
  once and recorded as ``applied: False``.

Results do not depend on the path beyond float rounding (``tests/test_cpu_conv.py`` checks a training
step under both). ``record()`` is what ``results.json`` and the benchmarks' JSON carry.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import importlib.util
import json
import logging
import os
import platform
import subprocess
import sys
from pathlib import Path

__all__ = ["Choice", "choose", "measure", "record", "ENV", "FLAG", "PATHS"]

ENV = "DTL_JAX_CPU_CONV"  # off | eigen | ynn | auto
FLAG = "--xla_cpu_experimental_ynn_fusion_type"
PATHS = {"eigen": f"{FLAG}=-individual_convolution", "ynn": ""}  # "ynn": XLA's default, no flag
MARGIN = 0.9  # Eigen must take at most this fraction of YNNPACK's time to be chosen
CACHE_VERSION = 1
_ACCELERATOR_PLUGINS = ("jax_cuda12_plugin", "jax_cuda13_plugin", "jax_rocm60_plugin", "jax_rocm7_plugin", "libtpu")

log = logging.getLogger("dtl_jax")

# One conv net's gradient step, timed in a fresh interpreter (only jax imported: quick to start).
PROBE = r"""
import json, sys, time
import jax, jax.numpy as jnp

def loss(params, x):
    for i, w in enumerate(params):
        x = jax.nn.relu(jax.lax.conv_general_dilated(x, w, (1, 1), "SAME",
                                                     dimension_numbers=("NHWC", "HWIO", "NHWC")))
        if i % 2 == 1:
            x = jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, 2, 2, 1), (1, 2, 2, 1), "VALID")
    return jnp.mean(x ** 2)

widths = [3, 16, 16, 32, 32, 64, 64]
keys = jax.random.split(jax.random.PRNGKey(0), len(widths))
params = [0.1 * jax.random.normal(k, (3, 3, a, b)) for k, a, b in zip(keys, widths[:-1], widths[1:])]
x = jax.random.normal(keys[-1], (64, 32, 32, 3))
step = jax.jit(jax.grad(loss))
for _ in range(2):
    jax.block_until_ready(step(params, x))
times = []
for _ in range(int(sys.argv[1])):
    start = time.perf_counter()
    jax.block_until_ready(step(params, x))
    times.append(time.perf_counter() - start)
print(json.dumps({"ms": 1000 * min(times), "platform": jax.devices()[0].platform}))
"""


@dataclasses.dataclass(frozen=True)
class Choice:
    """The convolution path of this process.

    ``path``: ``eigen``, ``ynn`` (XLA's default), or ``None`` when dtl_jax chose nothing (``off``, an
    accelerator, a failed measurement, or a user flag it could not read). ``source``: ``measured``,
    ``cached``, ``env`` (``DTL_JAX_CPU_CONV``), ``xla_flags`` (the user's own flag), ``off``,
    ``accelerator`` or ``failed``. ``applied``: whether ``XLA_FLAGS`` held the path's setting before
    the CPU backend started. ``timings_ms``: the probe's step time under each path, when measured.
    """

    path: str | None
    source: str
    applied: bool
    timings_ms: dict | None = None


_choice: Choice | None = None


def processor() -> str:
    """The processor model (``/proc/cpuinfo``'s model name where there is one)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _jaxlib_version() -> str:
    try:
        return importlib.metadata.version("jaxlib")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def cache_key() -> str:
    return f"{processor()} | {os.cpu_count()} cpus | jaxlib {_jaxlib_version()}"


def cache_file() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "dtl_jax" / "cpu_conv.json"


def _read_cache() -> dict:
    try:
        data = json.loads(cache_file().read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) and data.get("version") == CACHE_VERSION else {}


def _write_cache(key: str, entry: dict) -> None:
    data = _read_cache() or {"version": CACHE_VERSION}
    data.setdefault("entries", {})[key] = entry
    path = cache_file()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(data, indent=1))
        tmp.replace(path)
    except OSError as err:  # an unwritable cache only costs a measurement next time
        log.warning("dtl_jax: cannot write %s (%s); the convolution path will be measured again", path, err)


def _with_flag(flags: str, path: str) -> str:
    return " ".join(part for part in (flags.strip(), PATHS[path]) if part)


def probe(path: str, repeats: int = 5, timeout: float = 120.0) -> float:
    """The probe's step time in ms under ``path``, in a subprocess (raises ``RuntimeError`` on failure)."""
    env = dict(os.environ)
    env.update(XLA_FLAGS=_with_flag(env.get("XLA_FLAGS", ""), path), JAX_PLATFORMS="cpu", **{ENV: "off"})
    env.pop("JAX_NUM_CPU_DEVICES", None)  # one device, as a default run has
    try:
        done = subprocess.run(
            [sys.executable, "-c", PROBE, str(repeats)], env=env, capture_output=True, text=True, timeout=timeout
        )
    except (OSError, subprocess.TimeoutExpired) as err:
        raise RuntimeError(f"the {path} probe did not finish: {err}") from None
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise RuntimeError(f"the {path} probe failed: {last}")
    return float(json.loads(done.stdout.strip().splitlines()[-1])["ms"])


def measure(repeats: int = 5) -> dict:
    """``{"eigen": ms, "ynn": ms}``: the probe under each path (Eigen first, then YNNPACK)."""
    return {path: probe(path, repeats) for path in ("eigen", "ynn")}


def pick(timings: dict) -> str:
    """The path to use given ``measure()``'s timings: Eigen only when clearly faster."""
    return "eigen" if timings["eigen"] <= MARGIN * timings["ynn"] else "ynn"


def _backend_running() -> bool:
    try:
        from jax._src import xla_bridge
    except ImportError:  # no JAX: nothing is running
        return False
    return bool(xla_bridge.backends_are_initialized())


def _accelerator() -> bool:
    platforms = os.environ.get("JAX_PLATFORMS", "").strip().lower()
    if platforms and "cpu" not in platforms.split(","):
        return True
    if platforms == "cpu":
        return False
    return any(importlib.util.find_spec(name) is not None for name in _ACCELERATOR_PLUGINS)


def _user_path(flags: str) -> str | None:
    for part in flags.split():
        if part.startswith(FLAG):
            return "eigen" if part == PATHS["eigen"] else None
    return None


def _decide() -> tuple[str | None, str, dict | None]:
    """``(path, source, timings)`` without touching the environment."""
    flags = os.environ.get("XLA_FLAGS", "")
    if FLAG in flags:
        return _user_path(flags), "xla_flags", None
    setting = os.environ.get(ENV, "auto").strip().lower() or "auto"
    if setting == "off":
        return None, "off", None
    if setting in PATHS:
        return setting, "env", None
    if setting != "auto":
        log.warning("dtl_jax: %s=%r is not one of off, eigen, ynn, auto: measuring", ENV, setting)
    if _accelerator():
        return None, "accelerator", None
    key = cache_key()
    entry = _read_cache().get("entries", {}).get(key)
    if entry and entry.get("path") in PATHS:
        return entry["path"], "cached", entry.get("timings_ms")
    print(
        f"dtl_jax: timing XLA:CPU's two convolution paths once for this processor (about 10 s; the choice is "
        f"kept in {cache_file()})",
        file=sys.stderr,
        flush=True,
    )
    try:
        timings = measure()
    except RuntimeError as err:
        log.warning("dtl_jax: could not measure XLA:CPU's convolution paths (%s); keeping XLA's default", err)
        return None, "failed", None
    path = pick(timings)
    _write_cache(key, {"path": path, "timings_ms": timings})
    return path, "measured", timings


def choose() -> Choice:
    """Decides this process's convolution path and, if the CPU backend has not started, applies it to
    ``XLA_FLAGS``. Runs once per process; later calls return the first answer."""
    global _choice
    if _choice is not None:
        return _choice
    path, source, timings = _decide()
    applied = source == "xla_flags"
    if path is not None and source != "xla_flags":
        if _backend_running():
            log.warning(
                "dtl_jax: JAX's backend was started before dtl_jax was imported, so XLA:CPU's %s convolution "
                "path could not be applied (import dtl_jax first, or set XLA_FLAGS yourself)",
                path,
            )
        else:
            if PATHS[path]:
                os.environ["XLA_FLAGS"] = _with_flag(os.environ.get("XLA_FLAGS", ""), path)
            applied = True
    _choice = Choice(path, source, applied, timings)
    return _choice


def record() -> dict:
    """What results and benchmarks record: the choice, the processor and the ``XLA_FLAGS`` in force."""
    choice = choose()
    return {**dataclasses.asdict(choice), "processor": processor(), "xla_flags": os.environ.get("XLA_FLAGS", "")}


def run_per_path(argv: list[str], timeout: float = 3600.0) -> dict:
    """Runs ``python *argv --json FILE`` once under each path (``DTL_JAX_CPU_CONV=eigen`` / ``ynn``, any
    convolution flag removed from ``XLA_FLAGS``), Eigen first; returns ``{path: the JSON it wrote}``. For
    benchmarks that report both paths beside the chosen one (the flag must be set before a process's
    backend starts, hence a process per path)."""
    import tempfile

    out = {}
    for path in ("eigen", "ynn"):
        env = dict(os.environ)
        env["XLA_FLAGS"] = " ".join(p for p in env.get("XLA_FLAGS", "").split() if not p.startswith(FLAG))
        env[ENV] = path
        with tempfile.TemporaryDirectory() as tmp:
            target = Path(tmp) / "out.json"
            done = subprocess.run([sys.executable, *argv, "--json", str(target)], env=env, timeout=timeout)
            if done.returncode != 0:
                raise RuntimeError(f"{argv[0]} under the {path} path exited with {done.returncode}")
            out[path] = json.loads(target.read_text())
    return out
