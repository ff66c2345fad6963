"""A fast smoke run on scikit-learn's 8x8 digits (source = digits 0-4, target = 5-9), an MLP.

Digits leaves piggyback learning no headroom (shared notes): use it to check the pipeline, not DTL.
"""

import dataclasses

from dtl_jax.config import Config, DataConfig, ModelConfig, OptimConfig, PiggybackConfig, TaskConfig


def get_config() -> Config:
    base = Config()
    return dataclasses.replace(
        base,
        workdir="runs/digits",
        data=DataConfig(
            source=TaskConfig(dataset="digits", classes=(0, 1, 2, 3, 4)),
            target=TaskConfig(dataset="digits", classes=(5, 6, 7, 8, 9)),
            image_size=0,
            channels=1,
            flip=False,
        ),
        model=ModelConfig(name="mlp", widths=(64, 64)),
        pretrain=OptimConfig(epochs=5, batch_size=50),
        transfer=OptimConfig(epochs=3, batch_size=50),
        disposal=dataclasses.replace(
            base.disposal, steps=20, eval_every=10, source_batch_size=50, num_chunks=5, gc_lambda=0.01, probe_shots=5
        ),
        piggyback=PiggybackConfig(optimizer="sgd", learning_rate=0.01, epochs=5, batch_size=25, shots=(5,), repeats=2),
    )
