"""Selective unlearning on CIFAR-10 at CPU scale: all 50,000 training images at 16x16, the small CNN,
partial-class forgetting of class 0 (airplane) by default; ``--scenario``/``--forget-class``/
``--forget-fraction`` change it. Full CIFAR-10 through tfds, or an image folder with
``DTL_JAX_CIFAR10=/path/to/cifar10``::

    dtl-jax unlearn configs/unlearn_cifar10.py --scenario random --forget-fraction 0.1
"""

import dataclasses
import os

from dtl_jax.config import Config, OptimConfig, TaskConfig


def get_config() -> Config:
    root = os.environ.get("DTL_JAX_CIFAR10", "")
    base = Config()
    return dataclasses.replace(
        base,
        workdir="runs/unlearn_cifar10",
        data=dataclasses.replace(base.data, image_size=16),
        unlearn=dataclasses.replace(
            base.unlearn,
            task=TaskConfig(dataset="folder" if root else "cifar10", root=root),
            original=OptimConfig(epochs=20, batch_size=128, schedule="cosine"),
            optim=OptimConfig(optimizer="sgd", learning_rate=0.01, epochs=5, batch_size=128),
        ),
    )
