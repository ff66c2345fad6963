"""dtl_jax: selective unlearning on JAX. Disposable transfer learning with the Gradient Collision loss."""

__version__ = "0.1.0"

from dtl_jax.gc import gc_loss  # noqa: E402

__all__ = ["gc_loss", "__version__"]
