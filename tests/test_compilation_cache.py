"""JAX's persistent compilation cache: on by default, movable and switchable off."""

import jax
import jax.numpy as jnp
import pytest

from dtl_jax import compilation_cache


def test_cache_dir_precedence(monkeypatch, tmp_path):
    monkeypatch.delenv(compilation_cache.ENV, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert compilation_cache.cache_dir() == tmp_path / "xdg" / "dtl_jax" / "jax"
    monkeypatch.setenv(compilation_cache.ENV, str(tmp_path / "env"))
    assert compilation_cache.cache_dir() == tmp_path / "env"
    assert compilation_cache.cache_dir(str(tmp_path / "key")) == tmp_path / "key"  # the config key wins
    assert compilation_cache.cache_dir("off") is None
    monkeypatch.setenv(compilation_cache.ENV, "OFF")
    assert compilation_cache.cache_dir() is None


@pytest.mark.slow
def test_a_compiled_function_lands_in_the_cache(tmp_path):
    import subprocess
    import sys

    code = (
        "import jax, jax.numpy as jnp\n"
        "from dtl_jax import compilation_cache\n"
        f"compilation_cache.enable({str(tmp_path)!r})\n"
        "jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.0)\n"
        "f = jax.jit(lambda x: jnp.sin(x) @ jnp.cos(x).T)\n"
        "f(jnp.ones((64, 64))).block_until_ready()\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
    assert any(tmp_path.iterdir()), "nothing was written to the compilation cache"


def test_enable_off_sets_no_directory():
    before = jax.config.jax_compilation_cache_dir
    try:
        assert compilation_cache.enable("off") is None
        assert jax.config.jax_compilation_cache_dir is None
        jnp.ones(3).block_until_ready()
    finally:
        jax.config.update("jax_compilation_cache_dir", before)


def test_an_unwritable_cache_warns_and_runs_without_it(tmp_path, capsys):
    """The cache folder cannot be made (a file is in the way; as root, a read-only folder would still be
    writable): a one-line warning naming it, and the run goes on without the cache."""
    from dtl_jax import cli

    blocker = tmp_path / "file"
    blocker.write_text("x")
    before = jax.config.jax_compilation_cache_dir
    try:
        with pytest.warns(UserWarning, match=f"compilation cache '{blocker / 'jax'}' cannot be written"):
            assert compilation_cache.enable(str(blocker / "jax")) is None
        assert jax.config.jax_compilation_cache_dir is None
        # through the CLI: one warning line, then the run's own (here: a user error, after the cache is set up)
        argv = ["run", "digits", "--quiet", "--workdir", str(tmp_path / "w"),
                "--set", f"compilation_cache={blocker}/jax", "--set", "data.source.classes=1"]  # fmt: skip
        with pytest.warns(UserWarning) as caught:
            assert cli.main(argv) == 2
        lines = [str(w.message) for w in caught if "compilation cache" in str(w.message)]
        assert len(lines) == 1 and "\n" not in lines[0]
        text = __import__("warnings").formatwarning(caught[0].message, caught[0].category, caught[0].filename, 1)
        assert text.startswith("dtl-jax: warning: compilation cache") and text.count("\n") == 1
        assert not (tmp_path / "w").exists()  # the failed run left no empty workdir
    finally:
        jax.config.update("jax_compilation_cache_dir", before)
