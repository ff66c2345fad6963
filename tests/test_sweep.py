import json

import pytest
from conftest import tiny_config

from dtl_jax import sweep
from dtl_jax.train import loop


@pytest.mark.slow
def test_sweep_runs_the_grid_and_reuses_pretraining(tmp_path, monkeypatch):
    ran = []
    original = loop.run_steps
    monkeypatch.setattr(loop, "run_steps", lambda *a, **k: (ran.append(k["desc"]), original(*a, **k))[1])
    summary = sweep.run(
        tiny_config(), ["disposal.gc_lambda=0.001,0.5", "disposal.methods=gc", "data.source.classes=0,1,2,3"], tmp_path,
        quiet=True,
    )  # fmt: skip
    assert summary["swept"] == ["disposal.gc_lambda"]
    assert summary["fixed"] == ["disposal.methods=gc", "data.source.classes=0,1,2,3"]  # a tuple key is not swept
    assert [p["values"]["disposal.gc_lambda"] for p in summary["points"]] == ["0.001", "0.5"]
    assert ran.count("pretrain") == 1 and ran.count("transfer") == 1 and ran.count("disposal gc") == 2
    saved = json.loads((tmp_path / "sweep.json").read_text())
    assert saved == json.loads(json.dumps(summary))
    for point in ("disposal.gc_lambda=0.001", "disposal.gc_lambda=0.5"):
        assert (tmp_path / "points" / point / "results.json").is_file()
    assert (tmp_path / "sweep.png").stat().st_size > 1000
    assert "disposal.gc_lambda" in sweep.format_table(summary)


@pytest.mark.slow
def test_sweep_over_seeds_gives_intervals(tmp_path):
    summary = sweep.run(
        tiny_config(), ["disposal.gc_lambda=0.001,0.5", "disposal.methods=gc"], tmp_path, quiet=True, seeds=[0, 1]
    )
    assert summary["seeds"] == [0, 1]
    for point in summary["points"]:
        assert set(point["ci95"]) == set(point["models"]) and point["ci95"]["gc"]["pl_acc"] >= 0
    assert (tmp_path / "points" / "disposal.gc_lambda=0.5" / "summary.json").is_file()
    assert (tmp_path / "seed-1" / "results.json").is_file()


def _compiles(workdir, lambdas: str) -> int:
    """Programs compiled by ``dtl-jax sweep configs/digits.py`` over ``disposal.gc_lambda=lambdas`` (GC
    only), in a fresh process with ``JAX_LOG_COMPILES=1`` and the persistent compilation cache off."""
    import os
    import re
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "JAX_LOG_COMPILES": "1", "DTL_JAX_COMPILATION_CACHE": "off", "PYTHONPATH": str(root)}
    argv = ["sweep", str(root / "configs" / "digits.py"), "--quiet", "--workdir", str(workdir),
            "--set", "disposal.methods=gc", "--set", f"disposal.gc_lambda={lambdas}"]  # fmt: skip
    proc = subprocess.run([sys.executable, "-m", "dtl_jax.cli", *argv], env=env, capture_output=True, text=True,
                          timeout=1200)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    # JAX logs "Compiling jit(<name>) with global shapes ..." (through absl: "WARNING:...:Compiling ...")
    return sum(re.search(r"(^|:)Compiling ", line) is not None for line in proc.stderr.splitlines())


@pytest.mark.slow
def test_a_sweep_over_lambda_compiles_each_step_once(tmp_path):
    """λ is an argument of the disposal step, not a constant of its program, and the compile cache keys
    only on what shapes the program: sweeping four values compiles no more programs than sweeping two."""
    two = _compiles(tmp_path / "two", "0.1,0.2")
    four = _compiles(tmp_path / "four", "0.1,0.2,0.3,0.4")
    assert two > 0 and four <= two, (two, four)
