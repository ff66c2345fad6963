"""The unlearning baselines at their references' settings (docs/methods.md §2.2; OPTML-Group/Unlearn-Sparse and
Unlearn-Saliency ``arg_parser.py``, meghdadk/SCRUB, the Boundary Unlearning release) on the embedded default
task::

    dtl-jax unlearn configs/unlearn_reference.py

SGD, momentum 0.9, weight decay 5e-4, batch 256, constant learning rate, 10 epochs, the last partial batch
kept; each method's own learning rate: FT, RL, L1-sparse (α = 5e-4), SalUn (50 % of the weights) and
Boundary shrink (the SalUn harness, FGSM ε = 0.1 in pixel units) 0.01; GA 1e-4 for 5 epochs; SCRUB 5e-4 for
3 epochs (max-steps in the first 2, forget batch 512, retain batch 256, T = 4, γ = 0.99, α = 0.001).
Retrain uses the original model's recipe (``unlearn.original``); SURE keeps its own settings
(``unlearn.sure_*``). ``dtl-jax unlearn`` without a config (``dtl_jax.config.unlearn_default()``, whose task,
model and original model this config keeps) departs from these: see ``unlearn_default``'s docstring.
Another task at these settings: ``--set unlearn.task.dataset=cifar10`` (or ``configs/unlearn_cifar10.py``).
"""

import dataclasses

from dtl_jax.config import Config, OptimConfig, UnlearnConfig, unlearn_default

REFERENCE_OPTIM = OptimConfig(
    optimizer="sgd", learning_rate=0.01, momentum=0.9, weight_decay=5e-4, schedule="constant", epochs=10, batch_size=256
)


def reference_unlearn(base: UnlearnConfig) -> UnlearnConfig:
    """``base`` with every baseline's hyper-parameters set to its reference's (task, scenario, the original
    model's recipe and SURE's settings kept)."""
    return dataclasses.replace(
        base,
        optim=REFERENCE_OPTIM,
        ft_learning_rate=0.0,  # 0: FT, RL, L1-sparse, SalUn and Boundary shrink at REFERENCE_OPTIM's rate
        rl_learning_rate=0.0,
        l1_learning_rate=0.0,
        salun_learning_rate=0.0,
        boundary_learning_rate=0.0,
        ga_learning_rate=1e-4,
        ga_epochs=5,
        l1_alpha=5e-4,
        salun_sparsity=0.5,
        scrub_epochs=3,
        scrub_max_epochs=2,
        scrub_forget_batch=512,
        scrub_learning_rate=5e-4,
        scrub_gamma=0.99,
        scrub_alpha=0.001,
        kd_temperature=4.0,
        boundary_step=0.1,
    )


def get_config() -> Config:
    base = unlearn_default()  # dtl-jax unlearn's default experiment (the memorisation regime)
    return dataclasses.replace(base, workdir="runs/unlearn_reference", unlearn=reference_unlearn(base.unlearn))
