"""The default experiment: the embedded CIFAR-10 subset (source = classes 0-4, target = 5-9).

Equal to ``dtl_jax.config.Config()``: `dtl-jax run` with no config runs exactly this.
"""

from dtl_jax.config import Config


def get_config() -> Config:
    return Config()
