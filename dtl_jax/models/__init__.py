"""Models: a backbone plus named linear heads, applied as a pure function of its variables.

Variables are plain dicts::

    {"params": {"backbone": ..., "heads": {"source": {"kernel", "bias"}, "target": ...}},
     "batch_stats": {...}}          # empty for models without BatchNorm

``Network.apply(variables, images, head=..., train=...)`` returns ``(logits, features, batch_stats)``,
the last being the updated running statistics in train mode (unchanged in eval mode).
"""

from __future__ import annotations

import dataclasses

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp

from dtl_jax.config import MODELS, ModelConfig
from dtl_jax.errors import UserError
from dtl_jax.models.backbones import CNN, MLP, ResNet18

__all__ = ["Network", "build", "init_head"]


def init_head(key: jax.Array, feature_dim: int, num_classes: int) -> dict:
    """A fresh linear head ``features @ kernel + bias`` (LeCun-normal kernel, zero bias)."""
    return nn.Dense(num_classes).init(key, jnp.zeros((1, feature_dim)))["params"]


def apply_head(head: dict, features: jax.Array) -> jax.Array:
    return features @ head["kernel"] + head["bias"]


@dataclasses.dataclass(frozen=True)
class Network:
    backbone: nn.Module

    def init(self, key: jax.Array, image_shape: tuple[int, ...], heads: dict[str, int]) -> dict:
        keys = jax.random.split(key, len(heads) + 1)
        variables = dict(self.backbone.init(keys[0], jnp.zeros((1, *image_shape)), train=False))
        features = self.backbone.apply(variables, jnp.zeros((1, *image_shape)), train=False)
        params = {
            "backbone": variables["params"],
            "heads": {name: init_head(k, features.shape[-1], n) for k, (name, n) in zip(keys[1:], heads.items())},
        }
        return {"params": params, "batch_stats": variables.get("batch_stats", {})}

    def features(self, variables: dict, images: jax.Array, *, train: bool) -> tuple[jax.Array, dict]:
        backbone_vars = {"params": variables["params"]["backbone"]}
        if variables["batch_stats"]:
            backbone_vars["batch_stats"] = variables["batch_stats"]
            if train:
                features, updates = self.backbone.apply(backbone_vars, images, train=True, mutable=["batch_stats"])
                return features, updates["batch_stats"]
        return self.backbone.apply(backbone_vars, images, train=train), variables["batch_stats"]

    def apply(self, variables: dict, images: jax.Array, *, head: str, train: bool):
        chex.assert_rank(images, 4)  # [B, H, W, C]: checked once, when traced
        features, batch_stats = self.features(variables, images, train=train)
        return apply_head(variables["params"]["heads"][head], features), features, batch_stats


DTYPES = {"float32": None, "bfloat16": jnp.bfloat16}  # None: no casts (float32, or float64 under x64)


def build(config: ModelConfig) -> Network:
    """The network ``config`` describes (validated by ``dtl_jax.config.validate``). ``config.dtype`` is the
    backbone's compute dtype; parameters are float32 either way (``models.backbones``)."""
    if config.dtype not in DTYPES:
        raise UserError(f"model.dtype={config.dtype!r}: expected one of {', '.join(DTYPES)}")
    dtype = DTYPES[config.dtype]
    if config.name == "mlp":
        return Network(MLP(tuple(config.widths), dtype))
    if config.name == "cnn":
        return Network(CNN(tuple(config.widths), config.batch_norm, dtype))
    if config.name == "resnet18":
        if len(config.widths) != 4:
            raise UserError(f"a ResNet-18 has 4 stages: got widths {config.widths}, expected 4 (e.g. 64,128,256,512)")
        return Network(ResNet18(tuple(config.widths), dtype))
    raise UserError(f"unknown model {config.name!r}: expected one of {', '.join(MODELS)}")
