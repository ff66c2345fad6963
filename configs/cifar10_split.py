"""Split CIFAR-10 at CPU scale: source = classes 0-4, target = classes 5-9, all 50,000 training images at
16x16, the small CNN, the default run's disposal settings, PL on 10 % of the source training data.
Full CIFAR-10 through tfds (``cifar10``).

From an image folder instead (e.g. the JPEG tree ``cifar10/{train,test}/<class>/*.jpg``)::

    DTL_JAX_CIFAR10=/path/to/cifar10 dtl-jax run configs/cifar10_split.py
"""

import dataclasses
import os

from dtl_jax.config import Config, TaskConfig


def get_config() -> Config:
    root = os.environ.get("DTL_JAX_CIFAR10", "")
    dataset = "folder" if root else "cifar10"
    base = Config()
    return dataclasses.replace(
        base,
        workdir="runs/cifar10_split",
        data=dataclasses.replace(
            base.data,
            source=TaskConfig(dataset=dataset, root=root, classes=(0, 1, 2, 3, 4)),
            target=TaskConfig(dataset=dataset, root=root, classes=(5, 6, 7, 8, 9)),
            piggyback_fraction=0.1,
            image_size=16,
        ),
        pretrain=dataclasses.replace(base.pretrain, epochs=20, batch_size=128),
        transfer=dataclasses.replace(base.transfer, epochs=10, batch_size=128),
        disposal=dataclasses.replace(base.disposal, steps=300),
        piggyback=dataclasses.replace(base.piggyback, epochs=30, shots=(), repeats=1),
    )
