"""Test set-up: float64 available per test, quiet TF logging, shared tiny configs."""

import dataclasses
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import pytest  # noqa: E402

from dtl_jax.config import Config, DataConfig, ModelConfig, OptimConfig, PiggybackConfig, TaskConfig  # noqa: E402


def tiny_config(**changes) -> Config:
    """A seconds-long DTL run on scikit-learn digits with an MLP."""
    base = Config()
    config = Config(
        seed=0,
        data=DataConfig(
            source=TaskConfig(dataset="digits", classes=(0, 1, 2, 3)),
            target=TaskConfig(dataset="digits", classes=(5, 6, 7, 8)),
            image_size=0,
            channels=1,
            flip=False,
        ),
        model=ModelConfig(name="mlp", widths=(32,)),
        pretrain=OptimConfig(learning_rate=0.01, epochs=3, batch_size=32),
        transfer=OptimConfig(learning_rate=0.01, epochs=2, batch_size=32),
        disposal=dataclasses.replace(
            base.disposal, steps=6, eval_every=3, source_batch_size=32, num_chunks=4, gc_lambda=0.01, probe_shots=4
        ),
        piggyback=PiggybackConfig(optimizer="sgd", learning_rate=0.01, epochs=2, batch_size=8, shots=(4,), repeats=1),
    )
    return dataclasses.replace(config, **changes)


@pytest.fixture
def tiny():
    return tiny_config()


@pytest.fixture
def x64():
    import jax

    jax.config.update("jax_enable_x64", True)
    yield
    jax.config.update("jax_enable_x64", False)
