"""The frontier study of the README (issue 21): the default experiment (embedded CIFAR-10 subset, 16x16,
small CNN, the default disposal settings and λ grids of ``FrontierConfig``) with every disposal loss, the
suite of attacks, and two attacker draws a state::

    dtl-jax frontier configs/frontier_study.py --seeds 100-109 --workdir runs/frontier-heldout

The losses: GC as the paper has it, GC with its terms clipped apart (gc_sep), the bounded GC (gc_bound,
m = disposal.gc_bound), NGC, RTF, UTF, GA and SOPHON. The grids were fixed on tuning seed 0
(experiments/frontier_search.md) before the held-out seeds 100-109 ran.
"""

import dataclasses

from dtl_jax.config import Config


def get_config() -> Config:
    base = Config()
    return dataclasses.replace(
        base,
        workdir="runs/frontier_study",
        disposal=dataclasses.replace(
            base.disposal, methods=("gc", "gc_sep", "gc_bound", "ngc", "rtf", "utf", "ga", "sophon")
        ),
        piggyback=dataclasses.replace(
            base.piggyback, repeats=2, strategies=("fresh_all", "fresh_head", "own_all", "own_head", "fresh_all_lr10")
        ),
    )
