"""Process-level settings of a run that JAX reads outside the program: determinism and profiling.

**Determinism** (``--deterministic``, config ``deterministic``): XLA:GPU picks some reduction and
convolution algorithms at run time (autotuning, atomics), so two GPU runs of one seed can differ in the
last bits and then, training being chaotic, in their accuracies. ``set_deterministic()`` appends
``DETERMINISTIC_FLAGS`` to ``XLA_FLAGS`` (deterministic implementations, and an error instead of a
silently non-deterministic op), which XLA reads when its backend starts: so it must run before the first
JAX computation (the CLI does it right after parsing). On a CPU XLA is already deterministic (the same
seed and code give bit-identical runs); the flags are set anyway and change nothing there.

**Profiling** (``--profile DIR``, config ``profile``): ``StepProfiler`` records a ``jax.profiler`` trace
of ``steps`` steps of each stage after ``warmup`` steps (so compilation stays out of it), one trace folder
per stage under ``DIR/<stage>/``, each with an ``.xplane.pb`` file that TensorBoard's profile plugin
(``tensorboard --logdir DIR``, with ``tensorboard-plugin-profile``) or Perfetto (``ui.perfetto.dev``,
the ``.trace.json.gz`` beside it) opens. Piggyback learning runs many times: only its first run is traced.

**Interrupts** (Ctrl-C): Python raises ``KeyboardInterrupt`` wherever the main thread happens to be, and
where that is a garbage-collector callback (JAX runs one at every collection) the exception is printed
("Exception ignored in ...") and dropped, so the run went on as if Ctrl-C had not been pressed.
``catch_interrupts()`` (the CLI calls it first) installs a SIGINT handler that raises as Python's does and
also remembers the interrupt; ``check_interrupt()``, called before every training step
(``train.loop.run_steps``), raises it again there, at a point where the newest checkpoint is consistent.
Checkpoint writes and reads run under ``deferred_interrupts()``: Ctrl-C there is held until the write is
finished (orbax does its work in threads of its own; interrupted mid-write, they were left waiting on each
other and the process hung at exit after printing that it was interrupted), then raised.
"""

from __future__ import annotations

import contextlib
import os
import re
from pathlib import Path

_interrupted = False


def _on_sigint(signum, frame):
    global _interrupted
    _interrupted = True
    raise KeyboardInterrupt


def catch_interrupts() -> None:
    """SIGINT raises ``KeyboardInterrupt`` (as by default) and is remembered for ``check_interrupt``; forgets
    an earlier one. In the main thread only (where Python runs signal handlers); elsewhere a no-op."""
    import signal
    import threading

    global _interrupted
    _interrupted = False
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, _on_sigint)


@contextlib.contextmanager
def deferred_interrupts():
    """Holds SIGINT while the block runs and delivers it after the block (if the block ended normally) to the
    handler it was held from, so that what the block writes is written whole. In the main thread only
    (elsewhere, and where SIGINT's handler was not installed from Python, the block runs unchanged)."""
    import signal
    import threading

    previous = signal.getsignal(signal.SIGINT) if threading.current_thread() is threading.main_thread() else None
    if previous is None:
        yield
        return
    held = []
    signal.signal(signal.SIGINT, lambda signum, frame: held.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if held:  # delivered now, to the handler it was held from (``_on_sigint``: remembered, then raised)
        signal.raise_signal(signal.SIGINT)


def check_interrupt() -> None:
    """Raises ``KeyboardInterrupt`` if SIGINT arrived since ``catch_interrupts()``, even where its first
    ``KeyboardInterrupt`` was swallowed (module docstring)."""
    if _interrupted:
        raise KeyboardInterrupt


DETERMINISTIC_FLAGS = ("--xla_gpu_deterministic_ops=true", "--xla_gpu_exclude_nondeterministic_ops=true")


def _backend_running() -> bool:
    from jax._src import xla_bridge

    return bool(xla_bridge.backends_are_initialized())


def set_deterministic() -> bool:
    """Adds ``DETERMINISTIC_FLAGS`` to ``XLA_FLAGS``; returns whether they are in force, i.e. were
    present or could be added before JAX's backend started."""
    flags = os.environ.get("XLA_FLAGS", "").split()
    missing = [f for f in DETERMINISTIC_FLAGS if f not in flags]
    if not missing:
        return True
    if _backend_running():
        return False
    os.environ["XLA_FLAGS"] = " ".join([*flags, *missing])
    return True


def determinism_record(requested: bool) -> dict:
    """What ``results.json`` says of determinism: asked for, in force, and what it means on this platform."""
    import jax

    flags = os.environ.get("XLA_FLAGS", "").split()
    platform = jax.devices()[0].platform
    record = {"requested": requested, "flags_set": all(f in flags for f in DETERMINISTIC_FLAGS), "platform": platform}
    if platform == "cpu":
        record["note"] = "XLA:CPU is deterministic already: the same seed gives bit-identical runs either way"
    elif requested and not record["flags_set"]:
        record["note"] = "JAX's backend had started before the flags could be set: set XLA_FLAGS before starting"
    return record


class StepProfiler:
    """Traces ``steps`` steps of each stage after ``warmup`` steps (see the module docstring). The loop
    calls ``after_step(stage, done, state, last)`` after every step."""

    def __init__(self, directory: str | os.PathLike, warmup: int = 3, steps: int = 3):
        self.directory = Path(directory)
        self.warmup, self.steps = warmup, steps
        self.active: str | None = None
        self.traced: list[str] = []

    @staticmethod
    def kind(stage: str) -> str:
        """The stage a trace stands for: a piggyback run's model, budget and draw are dropped."""
        return "piggyback" if stage.startswith("piggyback") else stage

    def folder(self, stage: str) -> Path:
        return self.directory / re.sub(r"[^A-Za-z0-9_.-]+", "-", self.kind(stage)).strip("-")

    def after_step(self, stage: str, done: int, state, last: bool = False) -> None:
        import jax

        kind = self.kind(stage)
        if self.active is None and kind not in self.traced and done == self.warmup and not last:
            jax.block_until_ready(state)
            jax.profiler.start_trace(str(self.folder(stage)), create_perfetto_trace=True)
            self.active = kind
            self.traced.append(kind)
        elif self.active == kind and (done >= self.warmup + self.steps or last):
            jax.block_until_ready(state)
            jax.profiler.stop_trace()
            self.active = None

    def close(self) -> None:
        """Stops a trace still running (a stage that stopped early)."""
        if self.active is not None:
            import jax

            jax.profiler.stop_trace()
            self.active = None


_profiler: StepProfiler | None = None


def start_profiling(directory: str | os.PathLike | None) -> StepProfiler | None:
    """Turns step profiling on for this process (``None`` or ``""``: off); returns the profiler."""
    global _profiler
    if _profiler is not None:
        _profiler.close()
    _profiler = StepProfiler(directory) if directory else None
    return _profiler


def profiler() -> StepProfiler | None:
    """The process's step profiler, if profiling is on (read by the training loop)."""
    return _profiler
