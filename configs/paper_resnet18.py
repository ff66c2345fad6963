"""Paper-scale DTL (ICCV 2023 setting) for GPU/TPU jobs: ResNet-18, source CIFAR-100, and a target
chosen by ``DTL_JAX_TARGET``: ``stl10`` (default), ``svhn_cropped`` or ``tinyimagenet`` (an image folder
``root/{train,test}/<class>/*`` given by ``DTL_JAX_TINYIMAGENET``, TinyImageNet-style). All through tfds
except the folder. Images at 32x32; PL on 10 % of CIFAR-100's training data.

    DTL_JAX_TARGET=svhn_cropped dtl-jax run configs/paper_resnet18.py --workdir runs/paper-svhn
"""

import dataclasses
import os

from dtl_jax.config import Config, DataConfig, DisposalConfig, ModelConfig, OptimConfig, PiggybackConfig, TaskConfig


def get_config() -> Config:
    target_name = os.environ.get("DTL_JAX_TARGET", "stl10")
    if target_name == "tinyimagenet":
        target = TaskConfig(dataset="folder", root=os.environ.get("DTL_JAX_TINYIMAGENET", ""))
    else:
        target = TaskConfig(dataset=target_name)
    sgd = OptimConfig(optimizer="sgd", learning_rate=0.1, momentum=0.9, weight_decay=5e-4, schedule="cosine")
    return Config(
        workdir=f"runs/paper-{target_name}",
        data=DataConfig(
            source=TaskConfig(dataset="cifar100"),
            target=target,
            piggyback_fraction=0.1,
            image_size=32,
            val_fraction=0.05,
        ),
        model=ModelConfig(name="resnet18", widths=(64, 128, 256, 512)),
        pretrain=dataclasses.replace(sgd, epochs=100, batch_size=128),
        transfer=dataclasses.replace(sgd, learning_rate=0.01, epochs=30, batch_size=128),
        disposal=DisposalConfig(
            num_chunks=4,
            source_batch_size=128,
            steps=2000,
            eval_every=100,
            max_target_drop=0.03,
            optim=OptimConfig(optimizer="sgd", learning_rate=0.01, clip_norm=1.0),
        ),
        # PL on 10 % of CIFAR-100's training data (5,000 images): one attacker draw is enough at this size
        piggyback=PiggybackConfig(
            optimizer="sgd",
            learning_rate=0.01,
            momentum=0.9,
            weight_decay=5e-4,
            schedule="cosine",
            epochs=30,
            batch_size=128,
            repeats=1,
        ),
    )
