"""The four stages of disposable transfer learning (docs/methods.md §1), each checkpointed under its stage
key (``keys``) and reused by a later run whose inputs and code for it are unchanged.

    pre-train (source) ─▶ transfer (target) ─▶ [re-fit source head] ─▶ disposal (one per method)
                                                                      ─▶ piggyback learning (one per model,
                                                                         attacker budget and draw)

Modules, by job: ``keys`` (stage identity), ``experiment`` (tasks, network, mesh and the jitted functions
every stage shares), ``supervised`` (pre-training, transfer, the source-head re-fit), ``disposal`` and
``piggyback`` (the attack and the evaluation of every model). Every random choice draws from its own stream
(``dtl_jax.seeds``). Held-out checks read validation splits only, never a test split (docs/methods.md §3).
The names below are what ``dtl_jax.dtl`` runs.
"""

from dtl_jax.stages.disposal import DisposalMonitor, dispose
from dtl_jax.stages.experiment import Experiment, build_experiment, check, disposal_losses, initial_model
from dtl_jax.stages.keys import STAGE_FIELDS, model_key, stage_inputs, stage_key
from dtl_jax.stages.piggyback import evaluate_model, piggyback_learning, piggyback_run, random_init
from dtl_jax.stages.supervised import fit_head, pretrain, refit_source_head, supervised, transfer

__all__ = [
    "STAGE_FIELDS", "DisposalMonitor", "Experiment", "build_experiment", "check", "dispose", "disposal_losses",
    "evaluate_model", "fit_head", "initial_model", "model_key", "piggyback_learning", "piggyback_run",
    "pretrain", "random_init", "refit_source_head", "stage_inputs", "stage_key", "supervised", "transfer",
]  # fmt: skip
