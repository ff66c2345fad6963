"""Selective unlearning on CIFAR-10 at CPU scale: all 50,000 training images at 16x16, the small CNN with
BatchNorm (``dtl-jax unlearn``'s default model), partial-class forgetting of class 0 (airplane) by default;
``--scenario``/``--forget-class``/``--forget-fraction`` change it. Full CIFAR-10 through tfds, or an image
folder with ``DTL_JAX_CIFAR10=/path/to/cifar10``::

    dtl-jax unlearn configs/unlearn_cifar10.py --scenario random --forget-fraction 0.1

The original model (and Retrain) trains with the default's recipe (SGD lr 0.1, momentum 0.9, weight decay
5e-4, cosine, batch 128) for 30 epochs. **It does not memorise CIFAR-10**: this 72k-parameter CNN fits
about 80 % of the 45,000-47,000 training images (``experiments/memorise_search.md`` §5, with the
measurements and why more is out of reach on a CPU); the memorisation regime on CIFAR-10 is
``configs/unlearn_paper_resnet18.py`` on an accelerator. The baselines run at their references' settings
(``configs/unlearn_reference.py``: SGD, momentum 0.9, weight decay 5e-4, batch 256, 10 epochs, GA 5 and
SCRUB 3 epochs, SCRUB's forget batch 512, each method's reference learning rate); SURE at the default's
settings. Nothing was tuned on CIFAR-10.
"""

import dataclasses
import os

from dtl_jax.config import Config, TaskConfig, load


def get_config() -> Config:
    root = os.environ.get("DTL_JAX_CIFAR10", "")
    base = load("unlearn_reference")  # the default's task, model and recipe; the baselines at their references'
    return dataclasses.replace(
        base,
        workdir="runs/unlearn_cifar10",
        unlearn=dataclasses.replace(
            base.unlearn,
            task=TaskConfig(dataset="folder" if root else "cifar10", root=root),
            original=dataclasses.replace(base.unlearn.original, epochs=30),
        ),
    )
