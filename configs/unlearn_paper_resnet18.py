"""Paper-scale selective unlearning (SURE, ICLR 2025 setting) for GPU/TPU jobs: ResNet-18 on CIFAR-10
(tfds), 10 % random forgetting by default; class 0 partial or full with ``--scenario partial_class`` /
``--scenario full_class``::

    dtl-jax unlearn configs/unlearn_paper_resnet18.py --scenario full_class --forget-class 0
"""

import dataclasses

from dtl_jax.config import Config, DataConfig, ModelConfig, OptimConfig, TaskConfig


def get_config() -> Config:
    base = Config()
    sgd = OptimConfig(optimizer="sgd", learning_rate=0.1, momentum=0.9, weight_decay=5e-4, schedule="cosine")
    return dataclasses.replace(
        base,
        workdir="runs/unlearn_paper",
        data=DataConfig(image_size=32, val_fraction=0.1),
        model=ModelConfig(name="resnet18", widths=(64, 128, 256, 512)),
        unlearn=dataclasses.replace(
            base.unlearn,
            task=TaskConfig(dataset="cifar10"),
            scenario="random",
            forget_fraction=0.1,
            forget_class=0,
            original=dataclasses.replace(sgd, epochs=182, batch_size=256),
            # the baselines' reference settings (configs/unlearn_reference.py): constant lr, SCRUB forget batch 512
            optim=dataclasses.replace(sgd, learning_rate=0.01, epochs=10, batch_size=256, schedule="constant"),
            scrub_forget_batch=512,
            sure_domain_batch=32,
        ),
    )
