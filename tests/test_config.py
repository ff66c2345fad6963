import pytest

from dtl_jax import config as C
from dtl_jax.config import UserError


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
        ("disposal.num_chunks=1", "at least 2"),
        ("disposal.source_batch_size=81", "not divisible"),
        ("model.name=vit", "expected one of mlp, cnn, resnet18"),
        ("disposal.methods=gc,forget", "expected one of gc"),
        ("pretrain.optimizer=lbfgs", "expected one of sgd"),
        ("data.piggyback_fraction=1.5", "fraction"),
    ],
)
def test_validation(assignment, message):
    with pytest.raises(UserError, match=message):
        C.validate(C.apply_overrides(C.Config(), [assignment]))


def test_config_files_load_and_validate():
    for name in ("default", "digits", "cifar10_split", "paper_resnet18", "unlearn_cifar10", "unlearn_paper_resnet18"):
        assert isinstance(C.validate(C.load(name)), C.Config)
    assert C.load("default") == C.Config()
