"""Selective unlearning on CIFAR-10 at CPU scale: all 50,000 training images at 16x16, the small CNN,
partial-class forgetting of class 0 (airplane) by default; ``--scenario``/``--forget-class``/
``--forget-fraction`` change it. Full CIFAR-10 through tfds, or an image folder with
``DTL_JAX_CIFAR10=/path/to/cifar10``::

    dtl-jax unlearn configs/unlearn_cifar10.py --scenario random --forget-fraction 0.1

The baselines run at their references' settings (``configs/unlearn_reference.py``: SGD, momentum 0.9,
weight decay 5e-4, batch 256, 10 epochs, GA 5 and SCRUB 3 epochs, SCRUB's forget batch 512); the CPU-scale
departures are the image size (16x16) and the model (the small CNN, not ResNet-18). The original model (and
Retrain) trains for 20 epochs with Adam at batch 128.
"""

import dataclasses
import os

from dtl_jax.config import Config, OptimConfig, TaskConfig


def get_config() -> Config:
    root = os.environ.get("DTL_JAX_CIFAR10", "")
    base = Config()
    reference = OptimConfig(
        optimizer="sgd", learning_rate=0.01, momentum=0.9, weight_decay=5e-4, epochs=10, batch_size=256
    )
    return dataclasses.replace(
        base,
        workdir="runs/unlearn_cifar10",
        data=dataclasses.replace(base.data, image_size=16),
        unlearn=dataclasses.replace(
            base.unlearn,
            task=TaskConfig(dataset="folder" if root else "cifar10", root=root),
            original=OptimConfig(epochs=20, batch_size=128, schedule="cosine"),
            optim=reference,
            ga_epochs=5,
            scrub_epochs=3,
            scrub_forget_batch=512,
        ),
    )
