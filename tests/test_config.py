import pytest

from dtl_jax import config as C
from dtl_jax.errors import UserError


def test_overrides_parse_types_and_nested_keys():
    cfg = C.apply_overrides(
        C.Config(),
        [
            "seed=3",
            "disposal.gc_lambda=0.5",
            "data.source.classes=1,2,3",
            "data.flip=false",
            "disposal.optim.optimizer=adam",
            "disposal.methods=gc,ngc",
        ],
    )
    assert cfg.seed == 3 and cfg.disposal.gc_lambda == 0.5
    assert cfg.data.source.classes == (1, 2, 3) and cfg.data.flip is False
    assert cfg.disposal.optim.optimizer == "adam" and cfg.disposal.methods == ("gc", "ngc")


@pytest.mark.parametrize(
    ("assignment", "message"),
    [
        ("disposal.nope=1", "unknown config key"),
        ("nope=1", "unknown config key"),
        ("seed=abc", "expected a value of type int"),
        ("disposal=1", "is a section"),
        ("seed", "expected dotted.key=value"),
    ],
)
def test_bad_overrides(assignment, message):
    with pytest.raises(UserError, match=message):
        C.apply_overrides(C.Config(), [assignment])


@pytest.mark.parametrize(
    ("assignment", "message"),
    [
        ("disposal.num_chunks=1", "expected a number >= 2"),
        ("disposal.source_batch_size=81", "not divisible"),
        ("model.name=vit", "expected one of mlp, cnn, resnet18"),
        ("pretrain.optimizer=lbfgs", "expected one of sgd"),
        ("data.piggyback_fraction=1.5", r"expected a number in \(0, 1\]"),
    ],
)
def test_validation(assignment, message):
    with pytest.raises(UserError, match=message):
        C.validate(C.apply_overrides(C.Config(), [assignment]))


def test_config_files_load_and_validate():
    for name in C.named_configs():
        assert isinstance(C.validate(C.load(name)), C.Config)
    assert C.load("default") == C.Config()
    assert C.load(None) == C.Config() and C.load(None, "unlearn") == C.unlearn_default()


def test_every_numeric_field_has_a_range_rule():
    """Validation covers every numeric field: a new field without a rule in config.RULES fails here."""
    missing = [
        key
        for key, value in C.fields(C.Config())
        for item in (value if isinstance(value, tuple) else (value,))
        if isinstance(item, int | float) and not isinstance(item, bool) and C.rule_for(key) is None
    ]
    assert missing == []
    assert C.rule_for("piggyback.shots") is not None  # tuples of numbers are checked item by item


@pytest.mark.parametrize(
    ("assignment", "message"),
    [
        ("pretrain.learning_rate=nan", "pretrain.learning_rate=nan: expected a finite positive number"),
        ("disposal.optim.learning_rate=inf", "disposal.optim.learning_rate=inf: expected a finite positive number"),
        ("eval.batch_size=0", "eval.batch_size=0: expected a number >= 1"),
        ("disposal.max_grad_norm=-1", "disposal.max_grad_norm=-1.0: expected a positive number"),
        ("disposal.gc_lambda=-5", "disposal.gc_lambda=-5.0: expected a non-negative number"),
        ("disposal.gc_lambda=1e400", "disposal.gc_lambda=inf: expected a finite non-negative number"),
        ("unlearn.forget_fraction=1", "unlearn.forget_fraction=1.0: expected a number in [0, 1)"),
        ("piggyback.shots=5,0", "piggyback.shots=0"),
        ("seed=-1", "seed=-1"),
        ("data.val_fraction=0", "needs a validation split but data.val_fraction=0"),
        ("disposal.methods=", "disposal.methods=(): expected at least one disposal loss"),
    ],
)
def test_numeric_fields_are_finite_and_in_range(assignment, message):
    with pytest.raises(UserError) as err:
        C.validate(C.apply_overrides(C.Config(), [assignment]))
    assert message in str(err.value) and "\n" not in str(err.value)


def test_no_selection_on_test_data_without_a_validation_split():
    base = C.apply_overrides(C.Config(), ["data.val_fraction=0"])
    with pytest.raises(UserError, match="disposal.selection=min_probe needs a validation split"):
        C.validate(base)
    with pytest.raises(UserError, match="disposal.max_target_drop=0.03 .* needs a validation split"):
        C.validate(C.apply_overrides(base, ["disposal.selection=last"]))
    # Neither rule on: allowed (the disposal returns its last state and reads no held-out data).
    C.validate(C.apply_overrides(base, ["disposal.selection=last", "disposal.max_target_drop=1"]))


def test_named_configs_are_the_shipped_files():
    from pathlib import Path

    shipped = sorted(p.stem for p in (Path(__file__).parent.parent / "configs").glob("*.py") if p.stem != "__init__")
    assert sorted(C.named_configs()) == shipped
    with pytest.raises(UserError, match="not found: expected a .py file with get_config\\(\\) or one of"):
        C.load("no_such_config")


def test_method_names_are_checked_where_methods_are_resolved(tmp_path):
    """Config validation checks values (it imports no registry); the experiment resolves disposal.methods
    and refuses an unknown name, naming the key, before any work."""
    from dtl_jax import dtl, stages

    bad = C.apply_overrides(C.Config(), ["disposal.methods=gc,forget"])
    C.validate(bad)
    from dtl_jax.losses import DISPOSAL_LOSSES

    with pytest.raises(UserError, match="disposal.methods='forget': expected one of " + ", ".join(DISPOSAL_LOSSES)):
        stages.check(bad)
    with pytest.raises(UserError, match="disposal.methods='forget'"):
        dtl.run(bad, tmp_path / "w", quiet=True)
    assert not (tmp_path / "w").exists()
