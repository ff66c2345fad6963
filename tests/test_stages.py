"""Stage identity: a stage's key hashes exactly what the stage reads; a frozen backbone stays frozen."""

import dataclasses

import jax
import numpy as np
import pytest
from conftest import tiny_config

from dtl_jax import stages
from dtl_jax.config import Config, ModelConfig
from dtl_jax.train.compiled import Compiled


def _keys(config: Config) -> dict[str, str]:
    keys = {stage: stages.stage_key(config, stage) for stage in ("pretrain", "transfer", "refit", "random_init")}
    for method in config.disposal.methods:
        keys[f"disposal {method}"] = stages.stage_key(config, "disposal", method)
    for model in ("random_init", "tl", *config.disposal.methods):
        keys[f"piggyback {model}"] = stages.stage_key(config, "piggyback", model, shots=10, draw=0)
    return keys


def _changed(before: Config, after: Config) -> set[str]:
    old, new = _keys(before), _keys(after)
    return {name for name in old if old[name] != new.get(name)}


def _with(config: Config, **disposal) -> Config:
    return dataclasses.replace(config, disposal=dataclasses.replace(config.disposal, **disposal))


def test_gc_lambda_reruns_only_the_methods_that_read_it():
    base = Config()
    changed = _changed(base, _with(base, gc_lambda=0.01))
    assert changed == {"disposal gc", "disposal ngc", "piggyback gc", "piggyback ngc"}


def test_fooling_lambda_reruns_only_rtf_utf_ga():
    base = Config()
    changed = _changed(base, _with(base, fooling_lambda=0.5))
    assert changed == {f"{stage} {m}" for stage in ("disposal", "piggyback") for m in ("rtf", "utf", "ga")}


def test_adding_or_dropping_a_method_reruns_nothing_else():
    base = _with(Config(), methods=("gc", "rtf"))
    more = _with(base, methods=("gc", "rtf", "utf"))
    old, new = _keys(base), _keys(more)
    assert all(new[name] == key for name, key in old.items())


def test_upstream_changes_propagate_and_unread_fields_do_not():
    base = Config()
    # transfer settings: everything after pre-training
    changed = _changed(base, dataclasses.replace(base, transfer=dataclasses.replace(base.transfer, epochs=3)))
    assert "pretrain" not in changed and "random_init" not in changed
    assert {"transfer", "refit", "disposal gc", "piggyback tl", "piggyback gc"} <= changed
    # fields pre-training never reads leave it alone
    target = dataclasses.replace(base.data, target=dataclasses.replace(base.data.target, classes=(5, 6, 7)))
    assert "pretrain" not in _changed(base, dataclasses.replace(base, data=target))
    for unread in ({"checkpoint_every": 7}, {"eval": dataclasses.replace(base.eval, batch_size=99)}):
        assert _changed(base, dataclasses.replace(base, **unread)) == set()
    assert _changed(base, _with(base, devices=2, gc_low_memory=True)) == set()  # same results by construction
    # the seed: every stage
    assert _changed(base, dataclasses.replace(base, seed=1)) == set(_keys(base))


def test_piggyback_keys_differ_per_budget_and_draw():
    config = Config()
    keys = {stages.stage_key(config, "piggyback", "tl", shots=s, draw=d) for s in (5, 10) for d in (0, 1)}
    assert len(keys) == 4


@pytest.mark.slow
def test_refit_keeps_the_backbone_and_its_batchnorm_statistics_frozen(tmp_path):
    config = tiny_config(model=ModelConfig(name="cnn", widths=(4, 8), batch_norm=True))
    config = dataclasses.replace(config, data=dataclasses.replace(config.data, image_size=8, channels=1))
    exp = stages.build_experiment(config, tmp_path, quiet=True)
    pretrained, _ = stages.pretrain(exp)
    tl, _ = stages.transfer(exp, pretrained)
    refit, meta = stages.refit_source_head(exp, tl)
    assert meta["devices"] == exp.devices and meta["history"]
    for part in ("backbone",):
        assert jax.tree.all(jax.tree.map(np.array_equal, refit["params"][part], tl["params"][part]))
    assert jax.tree.leaves(tl["batch_stats"]), "the model must have BatchNorm statistics for this test"
    assert jax.tree.all(jax.tree.map(np.array_equal, refit["batch_stats"], tl["batch_stats"]))
    assert jax.tree.all(
        jax.tree.map(np.array_equal, refit["params"]["heads"]["target"], tl["params"]["heads"]["target"])
    )
    moved = jax.tree.map(
        lambda a, b: not np.array_equal(a, b), refit["params"]["heads"]["source"], tl["params"]["heads"]["source"]
    )
    assert all(jax.tree.leaves(moved)), "the source head must be re-fitted"
    # and the re-fitted head beats the stale one on the source task
    old = exp.accuracy(tl, exp.source.val, "source")
    new = exp.accuracy(refit, exp.source.val, "source")
    assert new >= old


@pytest.mark.parametrize("stage", ["nope"])
def test_unknown_stage_is_a_key_error(stage):
    with pytest.raises(KeyError):
        stages.stage_key(Config(), stage)


@pytest.mark.slow
def test_seeds_share_the_disposal_program_and_each_distils_from_its_own_teacher(tmp_path):
    """The disposal step compiles once for all seeds (the teacher is an argument, not a constant; the
    state keeps its sharding from step to step), and a seed's disposal is the same whether its step was
    compiled for it or for an earlier seed."""
    config = dataclasses.replace(tiny_config(), disposal=dataclasses.replace(tiny_config().disposal, methods=("gc",)))
    shared = Compiled()

    def disposed(seed: int, compiled: Compiled, workdir) -> dict:
        exp = stages.build_experiment(dataclasses.replace(config, seed=seed), workdir, quiet=True, compiled=compiled)
        tl, _ = stages.transfer(exp, stages.pretrain(exp)[0])
        return jax.device_get(stages.dispose(exp, "gc", tl)[0])

    disposed(0, shared, tmp_path / "shared-0")
    programs = [fn for key, fn in shared._functions.items() if key[0] == "disposal"]
    assert len(programs) == 1
    step = programs[0][1]
    assert step._cache_size() == 1, "the state's sharding changed between steps: one compilation more"
    reused = disposed(1, shared, tmp_path / "shared-1")
    assert [fn for key, fn in shared._functions.items() if key[0] == "disposal"] == programs
    assert step._cache_size() == 1, "the second seed recompiled the disposal step"
    fresh = disposed(1, Compiled(), tmp_path / "fresh-1")
    assert jax.tree.all(jax.tree.map(np.array_equal, reused, fresh))


# --- what is not an input: the attacker's budgets; what is: the code ----------------------------------


def test_the_attackers_budgets_move_no_disposal_and_the_probe_has_its_own_field():
    """``piggyback.shots`` is only the attacker's budgets: adding or reordering budgets changes no disposal
    key (nor the PL runs of a budget already there); ``disposal.probe_shots`` sizes the held-out probe."""
    base = Config()
    for shots in ((5, 10), (10, 5), (10, 25, 50)):
        changed = _changed(base, dataclasses.replace(base, piggyback=dataclasses.replace(base.piggyback, shots=shots)))
        assert changed == set(), (shots, changed)
    assert _changed(base, _with(base, probe_shots=5)) == {
        f"{stage} {m}" for stage in ("disposal", "piggyback") for m in base.disposal.methods
    }
    assert Config().disposal.probe_shots == Config().piggyback.shots[0] == 10  # no default number moved


@pytest.fixture
def edited(monkeypatch):
    """``edit(module, new_source)``: the stage keys as if ``module``'s source were ``new_source``."""
    from dtl_jax import code_version

    def edit(module: str, text: str) -> None:
        real = code_version.source
        monkeypatch.setattr(code_version, "source", lambda name: text if name == module else real(name))
        code_version.code_version.cache_clear()

    yield edit
    code_version.code_version.cache_clear()


def test_a_stage_whose_code_changed_reruns_and_only_it(edited):
    """The stage keys carry the version of the code each stage runs (``dtl_jax.code_version``): a change to
    the GC loss's code re-runs the GC-family disposals and every disposal after them, but neither
    pre-training nor transfer; a docstring or comment changes nothing."""
    from dtl_jax import code_version

    base = Config()
    before = _keys(base)
    text = code_version.source("dtl_jax.gc")
    edited("dtl_jax.gc", text.replace('"""Gradient Collision (GC)', '"""Reworded: Gradient Collision (GC)', 1)
           + "\n# a comment\n")  # fmt: skip
    assert _keys(base) == before
    edited("dtl_jax.gc", text + "\nHVP_MODES = HVP_MODES + ()\n")
    changed = {name for name, key in _keys(base).items() if key != before[name]}
    assert {"disposal gc", "disposal rtf", "piggyback gc"} <= changed  # every disposal runs the same modules
    assert not changed & {"pretrain", "transfer", "refit", "random_init", "piggyback tl", "piggyback random_init"}


def test_code_versions_cover_what_each_stage_imports():
    from dtl_jax.code_version import BOOKKEEPING, closure, package_modules

    assert "dtl_jax.gc" in closure("dtl_jax.stages.disposal")
    assert "dtl_jax.disposal_objective" in closure("dtl_jax.stages.disposal")
    assert "dtl_jax.gc" not in closure("dtl_jax.stages.supervised")  # pre-training does not run GC
    assert "dtl_jax.train.steps" in closure("dtl_jax.stages.supervised")
    assert BOOKKEEPING <= set(package_modules())  # every module named there exists
    assert not set(closure("dtl_jax.stages.piggyback")) & BOOKKEEPING
