"""The benchmark scripts keep working: the accelerator suite in its tiny mode (what CI runs on a CPU), the
per-stage scaling sweep on 1 and 2 CPU devices, the seeds benchmark on digits, the SOPHON step benchmark in
its tiny mode and the compiled-program counter of ``gc_structure.py``. Timings are never checked (they depend
on the machine); the structure and the counts that do not are."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
STAGES = {"pretrain", "transfer", "refit", "disposal", "piggyback", "unlearn", "predict"}


def _run(argv, tmp_path, devices=None):
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(REPO)}
    if devices:
        env["JAX_NUM_CPU_DEVICES"] = str(devices)
    proc = subprocess.run(
        [sys.executable, *argv], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600, check=False
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc


@pytest.mark.slow
def test_accelerator_suite_tiny_writes_every_section(tmp_path):
    out = tmp_path / "suite.json"
    _run([str(REPO / "benchmarks" / "accelerator_suite.py"), "--tiny", "--json", str(out)], tmp_path)
    suite = json.loads(out.read_text())
    sections = suite["sections"]
    assert set(sections) == {"gc_step", "gc_resnet", "hvp", "sophon", "vs_pytorch", "memory", "scaling",
                             "default_run", "determinism"}  # fmt: skip
    # every section ran; the PyTorch comparison alone may be skipped, where PyTorch is missing (CI: no [bench])
    assert not [name for name, s in sections.items() if "error" in s or ("skipped" in s and name != "vs_pytorch")]
    assert suite["tiny"] and suite["device"]["backend"] == "cpu"
    assert sum(suite["estimate_s"].values()) <= 480  # the full suite's estimate: 8 minutes on one GPU
    gc_rows = sections["gc_step"]["rows"] + sections["gc_resnet"]["rows"]
    assert all(r["gc_ms"] > 0 and r["plain_ms"] > 0 for r in gc_rows)
    assert {(r["dtype"], r["variant"]) for r in sections["gc_step"]["rows"]} == {
        ("float32", "jvp"),
        ("float32", "batched"),
        ("bfloat16", "jvp"),
    }
    assert {(r["model"], r["variant"]) for r in sections["gc_resnet"]["rows"]} == {
        ("resnet18", "jvp"),
        ("resnet18", "batched"),
    }
    # the same gradient either way (float32 here); each step's compiled program counted, GC's arithmetic about
    # three plain gradients (the K chunk gradients and K HVPs); batched runs fewer, larger kernels
    for r in gc_rows:
        if r["dtype"] == "float32":
            assert r["rel_norm_diff_vs_jvp"] < 1e-4, r
        assert 2.0 < r["flops_ratio"] < 4.0 and r["program"]["ops"] > r["plain_program"]["ops"] > 0, r
    resnet = {r["variant"]: r["program"] for r in sections["gc_resnet"]["rows"]}
    assert resnet["batched"]["convs"] < resnet["jvp"]["convs"]
    assert any(k.endswith("/g2") for k in resnet["batched"]["conv_kinds"])  # grouped: one group per chunk
    assert all(r["hvp_over_grad"] > 0 for r in sections["hvp"]["rows"])
    assert {r["dtype"] for r in sections["hvp"]["rows"]} == {"float32", "bfloat16"}
    sophon = [r["variant"] for r in sections["sophon"]["rows"]]
    assert sophon[:2] == ["plain", "gc"] and {"sophon-fo-1", "sophon-hvp-1", "sophon-rev-1"} <= set(sophon)
    assert all(r["memory"]["plain"]["temp"] > 0 for r in sections["memory"]["rows"])
    if "skipped" in sections["vs_pytorch"]:  # only when PyTorch is missing
        assert "PyTorch" in sections["vs_pytorch"]["skipped"]
    else:
        assert sections["vs_pytorch"]["gc_value"]["rel_err"] <= 1e-3
    scaling = sections["scaling"]["stages"]
    assert set(scaling) == STAGES
    assert all(row["devices"] == 1 and row["comm_bytes"] == 0 for rows in scaling.values() for row in rows)
    run = sections["default_run"]
    assert run["wall_s"] > 0 and run["stage_devices"] == [1] and set(run["models"]) == {"random_init", "tl", "gc"}
    # --deterministic: recorded, and on a CPU (deterministic already) both runs and the default run agree
    determinism = sections["determinism"]
    assert determinism["recorded"]["requested"] and determinism["recorded"]["platform"] == "cpu"
    assert determinism["identical"] and determinism["differing"] == [] and determinism["same_as_default_run"]
    assert determinism["cost"] > 0 and set(determinism["models"]) == set(run["models"])


@pytest.mark.slow
def test_per_stage_scaling_on_two_devices(tmp_path):
    """``scaling.py --part stages``: every stage on 1 and 2 devices; on 2, each training stage's
    collectives carry at least its gradient (all-reduced), prediction gathers only the logits, and the
    per-device work shrinks."""
    out = tmp_path / "stages.json"
    script = str(REPO / "benchmarks" / "scaling.py")
    _run([script, "--part", "stages", "--tiny", "--devices", "1", "2", "--repeats", "1", "--json", str(out)], tmp_path)
    stages = json.loads(out.read_text())["stages"]
    assert set(stages) == STAGES
    for name, rows in stages.items():
        one, two = rows
        assert (one["devices"], two["devices"]) == (1, 2)
        assert one["comm_bytes"] == 0 and two["comm_bytes"] > 0, (name, two)
        assert two["examples_per_device"] == -(-one["batch"] // 2)
        assert two["flops_per_device"] < one["flops_per_device"], name
        if name == "predict":
            assert set(two["collectives"]) == {"all-gather"}  # the logits; features stay on their devices
        else:
            assert "all-reduce" in two["collectives"]


@pytest.mark.slow
def test_seeds_benchmark_reports_both_ratios_and_each_seed(tmp_path):
    out = tmp_path / "seeds.json"
    config = str(REPO / "configs" / "digits.py")
    _run([str(REPO / "benchmarks" / "seeds.py"), "--config", config, "--seeds", "0-1", "--json", str(out)], tmp_path)
    report = json.loads(out.read_text())
    assert len(report["many_seeds_each_s"]) == 2
    assert sum(report["many_seeds_each_s"]) <= report["many_seeds_s"]  # the seeds ran inside that process
    one = report["one_seed_s"]  # times are rounded to 0.1 s, the ratios computed before rounding
    assert report["warm_cache_ratio"] == pytest.approx(report["second_run_warm_cache_s"] / one, rel=1e-2)
    assert report["many_seeds_ratio"] == pytest.approx(report["many_seeds_s"] / one, rel=1e-2)


@pytest.mark.slow
def test_sophon_step_tiny_times_every_variant(tmp_path):
    """``sophon_step.py --tiny``: plain, GC and the three SOPHON gradients at each k, the HVP second order
    equal to the reverse-mode one and the first-order value to the second-order one (float32)."""
    out = tmp_path / "sophon.json"
    _run([str(REPO / "benchmarks" / "sophon_step.py"), "--tiny", "--json", str(out)], tmp_path)
    result = json.loads(out.read_text())
    names = [r["variant"] for r in result["rows"]]
    assert names[:2] == ["plain", "gc"]
    assert sorted(names[2:]) == sorted(f"sophon-{m}-{k}" for m in ("fo", "hvp", "rev") for k in (1, 2))
    assert all(r["ms"] > 0 and r["ratio"] > 0 for r in result["rows"])
    sophon = [r for r in result["rows"] if r["variant"].startswith("sophon")]
    assert all(r["hvp_vs_rev_grad_rel_diff"] < 1e-4 and r["fo_vs_so_value_rel_diff"] < 1e-5 for r in sophon)
    assert len(result["load_average_before"]) == 3


def test_gc_structure_counts_convolutions_their_kinds_and_chains():
    """``gc_structure.structure`` on compiled programs whose convolutions are known: two in a chain (depth 2),
    two side by side (depth 1), and a weight gradient (a window as wide as the activation: ``wgrad``)."""
    import jax
    import jax.numpy as jnp

    sys.path.insert(0, str(REPO / "benchmarks"))
    from gc_structure import structure

    def conv(x, w):
        return jax.lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))

    x, w = jnp.ones((4, 8, 8, 3)), jnp.ones((3, 3, 3, 3))

    def program(fn, *args):
        return structure(jax.jit(fn).lower(*args).compile().as_text())

    chain = program(lambda x, w: conv(jnp.tanh(conv(x, w)), w), x, w)
    side = program(lambda x, w, v: jnp.tanh(conv(x, w)) * conv(jnp.sin(x), v), x, w, 2 * w)
    weight_grad = program(jax.grad(lambda w, x: jnp.sum(conv(x, w) ** 2)), w, x)
    assert (chain["convs"], chain["conv_depth"], chain["conv_kinds"]) == (2, 2, {"act/4/g1": 2})
    assert (side["convs"], side["conv_depth"]) == (2, 1)
    assert weight_grad["conv_kinds"] == {"act/4/g1": 1, "wgrad/-/g1": 1} and weight_grad["conv_depth"] == 2
    assert chain["ops"] >= 2 and chain["fusions"] >= 0


@pytest.mark.slow
def test_gc_precision_separates_rounding_from_the_modes(tmp_path):
    """``gc_precision.py`` on a narrow ResNet-18: in float64 the HVP modes agree to rounding, in float32 each
    differs from float64 by more than that (what the script exists to tell apart), and bad input is one line."""
    out = tmp_path / "precision.json"
    argv = [str(REPO / "benchmarks" / "gc_precision.py"), "--model", "resnet18", "--widths", "4,4,8,8",
            "--batch", "8", "--chunks", "4", "--image-size", "8", "--json", str(out)]  # fmt: skip
    proc = _run(argv, tmp_path)
    result = json.loads(out.read_text())
    assert set(result["float64"]) == set(result["float32"]) == {"jvp", "batched"}
    assert result["float64"]["batched"]["vs_float64_jvp"]["max_leaf"] < 1e-9
    # float32 is rounding, not exact (here, 2 examples a chunk through BatchNorm, far from exact: ~1e-1)
    assert 1e-9 < result["float32"]["jvp"]["vs_float64_jvp"]["global"] < 1.0
    assert "vs_same_dtype_jvp" in result["float32"]["batched"]
    assert "float32" in proc.stdout and "batched" in proc.stdout
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(REPO)}
    bad = subprocess.run([sys.executable, argv[0], "--modes", "batched"], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=120, check=False)  # fmt: skip
    assert bad.returncode == 2 and "including jvp" in bad.stderr and "Traceback" not in bad.stderr


def test_vs_pytorch_runs_summarises_each_process(monkeypatch):
    """``vs_pytorch.py --runs N``: N processes of the script without ``--runs``/``--json`` (each given its own
    ``--json``), and each ratio's mean ± 95 % over them. PyTorch is not needed: the processes are faked."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        import vs_pytorch
    finally:
        sys.path.remove(str(REPO / "benchmarks"))
    assert vs_pytorch._without(["s.py", "--runs", "3", "--json", "o", "--runs=4", "--batch", "8"], "--runs") == [
        "s.py", "--json", "o", "--batch", "8"]  # fmt: skip
    ratios = iter([(1.1, 0.9), (1.0, 1.0), (0.9, 1.1)])
    seen = []

    def fake_run(cmd, timeout):
        seen.append(cmd)
        gc, plain = next(ratios)
        record = {"ours_over_pytorch": {"gc": gc, "plain": plain}, "gc_over_plain": {"jax": 2.0, "torch": 2.0 * gc}}
        Path(cmd[-1]).write_text(json.dumps(record))
        return subprocess.CompletedProcess(cmd, 0)

    monkeypatch.setattr(vs_pytorch.subprocess, "run", fake_run)
    result = vs_pytorch.repeated_runs(["vs_pytorch.py", "--runs", "3", "--json", "x.json", "--batch", "8"], 3)
    assert len(seen) == 3 and all(c[1:4] == ["vs_pytorch.py", "--batch", "8"] and c[-2] == "--json" for c in seen)
    gc = result["summary"]["gc ours/pytorch"]
    assert gc["n"] == 3 and abs(gc["mean"] - 1.0) < 1e-12 and abs(gc["std"] - 0.1) < 1e-12
    assert abs(gc["ci95"] - 4.302653 * 0.1 / 3**0.5) < 1e-5  # Student t, 2 dof
    assert len(result["runs"]) == 3
