"""The convolution path chooser (dtl_jax/cpu_conv.py): overrides, the cache, the backend-running case, and
that a training step does not depend on the path beyond float rounding."""

import json
import logging
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from dtl_jax import cpu_conv

VALID_FLAG = "--xla_cpu_enable_fast_min_max=false"  # a real XLA flag that is not the convolution path's


def _import_in_subprocess(env_changes: dict, tmp_path) -> dict:
    """Imports dtl_jax in a fresh interpreter (no JAX backend started) and returns its choice and XLA_FLAGS."""
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", cpu_conv.ENV)}
    env.update(XDG_CACHE_HOME=str(tmp_path / "cache"), **env_changes)
    code = "import json, os, dtl_jax; from dtl_jax import cpu_conv; print(json.dumps(cpu_conv.record()))"
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_off_leaves_xla_flags_untouched(tmp_path):
    got = _import_in_subprocess({cpu_conv.ENV: "off", "XLA_FLAGS": VALID_FLAG}, tmp_path)
    assert got["xla_flags"] == VALID_FLAG
    assert got["source"] == "off" and got["path"] is None
    assert not (tmp_path / "cache" / "dtl_jax" / "cpu_conv.json").exists()  # nothing measured


def test_off_without_xla_flags_sets_none(tmp_path):
    got = _import_in_subprocess({cpu_conv.ENV: "off"}, tmp_path)
    assert got["xla_flags"] == ""


def test_a_users_flag_is_never_overridden(tmp_path):
    user = f"{VALID_FLAG} {cpu_conv.FLAG}=individual_convolution"
    got = _import_in_subprocess({cpu_conv.ENV: "eigen", "XLA_FLAGS": user}, tmp_path)
    assert got["xla_flags"] == user
    assert got["source"] == "xla_flags"


def test_env_forces_a_path(tmp_path):
    got = _import_in_subprocess({cpu_conv.ENV: "eigen", "XLA_FLAGS": VALID_FLAG}, tmp_path)
    assert got["xla_flags"] == f"{VALID_FLAG} {cpu_conv.PATHS['eigen']}"
    assert (got["path"], got["source"], got["applied"]) == ("eigen", "env", True)
    got = _import_in_subprocess({cpu_conv.ENV: "ynn", "XLA_FLAGS": VALID_FLAG}, tmp_path)
    assert got["xla_flags"] == VALID_FLAG  # XLA's default path needs no flag
    assert (got["path"], got["applied"]) == ("ynn", True)


def test_cached_choice_is_used_without_measuring(tmp_path):
    cache = tmp_path / "cache" / "dtl_jax" / "cpu_conv.json"
    cache.parent.mkdir(parents=True)
    entry = {"path": "eigen", "timings_ms": {"eigen": 1.0, "ynn": 3.0}}
    cache.write_text(json.dumps({"version": cpu_conv.CACHE_VERSION, "entries": {cpu_conv.cache_key(): entry}}))
    got = _import_in_subprocess({cpu_conv.ENV: "auto"}, tmp_path)  # a measurement would say "measured"
    assert (got["path"], got["source"], got["applied"]) == ("eigen", "cached", True)
    assert got["xla_flags"] == cpu_conv.PATHS["eigen"]
    assert got["timings_ms"] == entry["timings_ms"]


def test_pick_needs_a_clear_margin():
    assert cpu_conv.pick({"eigen": 50.0, "ynn": 100.0}) == "eigen"
    assert cpu_conv.pick({"eigen": 95.0, "ynn": 100.0}) == "ynn"  # within the margin: XLA's default stays
    assert cpu_conv.pick({"eigen": 120.0, "ynn": 100.0}) == "ynn"


def test_a_running_backend_is_logged_and_not_applied(monkeypatch, caplog):
    import jax

    jax.devices()  # this process's backend is running
    monkeypatch.setattr(cpu_conv, "_choice", None)
    monkeypatch.setenv(cpu_conv.ENV, "eigen")
    monkeypatch.setenv("XLA_FLAGS", VALID_FLAG)
    with caplog.at_level(logging.WARNING, logger="dtl_jax"):
        choice = cpu_conv.choose()
        assert cpu_conv.choose() is choice  # once per process
    assert (choice.path, choice.applied) == ("eigen", False)
    assert os.environ["XLA_FLAGS"] == VALID_FLAG
    assert sum("could not be applied" in r.getMessage() for r in caplog.records) == 1


def test_measurement_is_cached(monkeypatch, tmp_path):
    monkeypatch.setattr(cpu_conv, "_choice", None)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.delenv(cpu_conv.ENV, raising=False)
    monkeypatch.delenv("XLA_FLAGS", raising=False)
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    calls = []
    monkeypatch.setattr(cpu_conv, "measure", lambda: calls.append(1) or {"eigen": 10.0, "ynn": 30.0})
    assert cpu_conv._decide() == ("eigen", "measured", {"eigen": 10.0, "ynn": 30.0})
    assert cpu_conv._decide()[:2] == ("eigen", "cached")
    assert len(calls) == 1


@pytest.mark.slow
def test_probe_measures_both_paths():
    timings = cpu_conv.measure(repeats=1)
    assert set(timings) == {"eigen", "ynn"} and all(t > 0 for t in timings.values())


STEP = textwrap.dedent(
    """
    import sys
    import numpy as np, jax, jax.numpy as jnp
    from dtl_jax.config import ModelConfig, OptimConfig
    from dtl_jax.gc import gc_loss
    from dtl_jax.losses import cross_entropy
    from dtl_jax.models import build
    from dtl_jax.train import optim
    import optax
    net = build(ModelConfig(name="cnn", widths=(8, 16), batch_norm=True))
    key = jax.random.PRNGKey(0)
    variables = net.init(key, (16, 16, 3), {"source": 4})
    batch = {"image": jax.random.normal(key, (16, 16, 16, 3)), "label": jnp.arange(16) % 4}
    def ce(params, b):
        logits, _, _ = net.apply({"params": params, "batch_stats": variables["batch_stats"]}, b["image"],
                                 head="source", train=True)
        return cross_entropy(logits, b["label"])
    loss = lambda p: ce(p, batch) + 0.1 * gc_loss(ce, p, batch, 4)
    tx = optax.sgd(0.05, momentum=0.9)
    params, state = variables["params"], tx.init(variables["params"])
    step = jax.jit(lambda p, s: (lambda g: (optax.apply_updates(p, tx.update(g, s, p)[0]), tx.update(g, s, p)[1]))(
        jax.grad(loss)(p)))
    for _ in range(3):
        params, state = step(params, state)
    flat = np.concatenate([np.ravel(x) for x in jax.tree.leaves(params)])
    np.save(sys.argv[1], flat)
    """
)


@pytest.mark.slow
def test_a_training_step_agrees_under_both_paths(tmp_path):
    """Three SGD steps of CE + 0.1·GC on a BatchNorm CNN: the same parameters to float rounding either way."""
    out = {}
    for path in ("eigen", "ynn"):
        env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
        env.update({cpu_conv.ENV: path, "JAX_PLATFORMS": "cpu"})
        env.pop("JAX_NUM_CPU_DEVICES", None)
        target = tmp_path / f"{path}.npy"
        done = subprocess.run([sys.executable, "-c", STEP, str(target)], env=env, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
        out[path] = np.load(target)
    np.testing.assert_allclose(out["eigen"], out["ynn"], rtol=1e-4, atol=1e-6)
    assert not np.array_equal(out["eigen"], np.zeros_like(out["eigen"]))
