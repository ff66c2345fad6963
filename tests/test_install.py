"""Packaging: the wheel carries the package and the named configs; ``dtl-jax run digits`` works from a
wheel installed in a fresh virtual environment, run outside the checkout."""

import os
import subprocess
import sys
import sysconfig
import tomllib
import venv
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_the_package_list_covers_every_package_in_the_tree():
    declared = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    on_disk = {
        ".".join(p.parent.relative_to(ROOT).parts)
        for p in (ROOT / "dtl_jax").rglob("__init__.py")
        if "__pycache__" not in p.parts
    }
    assert declared == on_disk | {"dtl_jax.configs"}


@pytest.mark.slow
def test_wheel_in_a_fresh_venv_runs_a_named_config(tmp_path):
    wheels = tmp_path / "wheels"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(wheels), str(ROOT)],
        check=True,
        timeout=300,
    )
    (wheel,) = wheels.glob("dtl_jax-*.whl")
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=False)
    python = env_dir / "bin" / "python"
    site = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    # The dependencies come from this interpreter's site-packages, added as a plain path: its .pth files
    # (the editable install of the checkout among them) are not run, so only the wheel provides dtl_jax.
    Path(site, "dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run([str(python), "-m", "pip", "install", "--no-deps", "-q", str(wheel)], check=True, timeout=300)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    where = subprocess.run(
        [str(python), "-c", "import dtl_jax, dtl_jax.configs; print(dtl_jax.__file__)"],
        capture_output=True, text=True, check=True, cwd=elsewhere, env=env,
    ).stdout  # fmt: skip
    assert where.startswith(str(env_dir)), where
    proc = subprocess.run(
        [str(env_dir / "bin" / "dtl-jax"), "run", "digits", "--quiet", "--workdir", str(elsewhere / "run")],
        capture_output=True, text=True, cwd=elsewhere, env=env, timeout=900,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "gc" in proc.stdout and (elsewhere / "run" / "results.json").is_file()
