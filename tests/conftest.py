"""Test set-up: four CPU devices, float64 available per test, quiet TF logging, shared tiny configs.

JAX fixes its device count when its backend starts, so this file, which pytest imports before any test,
asks for ``DEVICES`` CPU devices first (unless ``JAX_NUM_CPU_DEVICES`` is already set, e.g. by a test that
starts pytest in a subprocess): multi-device behaviour (sharded steps, data-parallel stages) is tested
in-process, in the fast tier. The *default* mesh stays one device (``mesh.set_default_devices(1)``), so that
every other test runs as on a one-device machine (the same programs, results and cost as before); a test
about several devices asks for them: a mesh of its own (``data_mesh(n)``), ``disposal.devices=n`` or
``mesh.default_devices(n)`` (the ``all_devices`` fixture). Subprocesses started by tests keep JAX's default
of one device unless they ask for more.
"""

import dataclasses
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import jax  # noqa: E402
import pytest  # noqa: E402

from dtl_jax.train import mesh  # noqa: E402

DEVICES = 4
if "JAX_NUM_CPU_DEVICES" not in os.environ:
    jax.config.update("jax_num_cpu_devices", DEVICES)
    mesh.set_default_devices(1)


# Cases the fast tier leaves to the slow one: each repeats, at another parameter, a path a fast case checks
# (the fast tier runs them once each, so that it stays quick on two cores).
SLOW_CASES = (
    "tests/test_gc.py::Float64Test::test_value_matches_explicit_pairs_(normalized=True, k=3)",
    "tests/test_gc.py::Float64Test::test_value_matches_explicit_pairs_(normalized=False, k=3)",
    "tests/test_gc.py::Float64Test::test_gradient_matches_hessian_reference_(mode='linearize', normalized=True)",
    "tests/test_gc.py::Float64Test::test_gradient_matches_hessian_reference_(mode='low_memory'",
    "tests/test_gc.py::Float64Test::test_low_memory_value_and_gradient_equal_default_(normalized=False, k=3)",
    "tests/test_gc.py::Float64Test::test_low_memory_value_and_gradient_equal_default_(normalized=True, k=3)",
    "tests/test_gc.py::Float64Test::test_low_memory_value_and_gradient_equal_default_(normalized=True, k=2)",
    "tests/test_models.py::test_backbone_plus_named_heads[config3-image3]",
    "tests/test_models.py::test_max_pool_equals_flax_bit_for_bit[False-shape1]",
    # the batched HVP: its Hessian check once (with jit), the per-chunk BatchNorm case once (True)
    "tests/test_gc.py::Float64Test::test_gradient_matches_hessian_reference_(mode='batched', normalized=False)__witho",
    "tests/test_gc.py::test_batched_equals_unrolled_with_per_chunk_batch_norm[False]",
    # bfloat16: the parameter/compute split stays fast; GC against float32 on the CNN is slow
    "tests/test_mixed_precision.py::test_gc_in_bfloat16_against_float32_default_cnn",
    # SOPHON: the fast tier keeps the MLP's finite-difference check of the second-order gradient (k = 1)
    "tests/test_sophon.py::test_first_order_is_the_outer_gradient_at_the_fine_tuned_weights",
    "tests/test_sophon.py::test_trajectory_mean_gradient_matches_finite_differences",
    "tests/test_sophon.py::test_inverse_ce_is_finite_for_a_confident_model",
    "tests/test_sophon.py::test_second_order_gradient_matches_finite_differences[cnn_bn",
    "tests/test_sophon.py::test_head_only_attacker_differentiates_the_closed_over_backbone",
    "tests/test_sophon.py::test_hvp_mode_needs_batches_of_one_shape",
    "tests/test_sophon.py::test_several_attackers_are_averaged",
    "tests/test_sophon.py::test_zero_steps_is_the_plain_suppression_loss",
    "tests/test_sophon.py::test_sharded_on_one_device_equals_unsharded",
    "tests/test_baselines.py::test_mia_efficacy_equals_the_reference[6000-5400]",
    "tests/test_sophon.py::test_hvp_gradient_equals_reverse_over_reverse[mlp-True-adam",
    "tests/test_sophon.py::test_fresh_head_fine_tuned_but_not_differentiated",
    "tests/test_mixed_precision.py::test_bfloat16_compute_float32_parameters",
    # subprocess checks: the fast tier keeps one of each kind (cpu_conv's "off", prepare's missing TensorFlow)
    "tests/test_cpu_conv.py::test_env_forces_a_path",
    "tests/test_cpu_conv.py::test_off_without_xla_flags_sets_none",
    "tests/test_cpu_conv.py::test_cached_choice_is_used_without_measuring",
    "tests/test_prepare.py::test_missing_importlib_resources_is_one_line",
    "tests/test_sure.py::test_run_logs_the_adversarial_game_every_step[dann]",
    "tests/test_models.py::test_backbone_plus_named_heads[config2-image2]",
)


def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.nodeid.startswith(SLOW_CASES):
            item.add_marker(pytest.mark.slow)


@pytest.fixture
def all_devices():
    """Within the test, steps built without a mesh of their own run on every device."""
    with mesh.default_devices(jax.device_count()):
        yield jax.device_count()


from dtl_jax.config import Config, DataConfig, ModelConfig, OptimConfig, PiggybackConfig, TaskConfig  # noqa: E402


def tiny_config(**changes) -> Config:
    """A seconds-long DTL run on scikit-learn digits with an MLP."""
    base = Config()
    config = Config(
        seed=0,
        data=DataConfig(
            source=TaskConfig(dataset="digits", classes=(0, 1, 2, 3)),
            target=TaskConfig(dataset="digits", classes=(5, 6, 7, 8)),
            image_size=0,
            channels=1,
            flip=False,
        ),
        model=ModelConfig(name="mlp", widths=(32,)),
        pretrain=OptimConfig(learning_rate=0.01, epochs=3, batch_size=32),
        transfer=OptimConfig(learning_rate=0.01, epochs=2, batch_size=32),
        disposal=dataclasses.replace(
            base.disposal, steps=6, eval_every=3, source_batch_size=32, num_chunks=4, gc_lambda=0.01, probe_shots=4
        ),
        piggyback=PiggybackConfig(optimizer="sgd", learning_rate=0.01, epochs=2, batch_size=8, shots=(4,), repeats=1),
    )
    return dataclasses.replace(config, **changes)


@pytest.fixture
def tiny():
    return tiny_config()


@pytest.fixture
def x64():
    import jax

    jax.config.update("jax_enable_x64", True)
    yield
    jax.config.update("jax_enable_x64", False)
