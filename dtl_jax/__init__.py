"""dtl_jax: selective unlearning on JAX. Disposable transfer learning with the Gradient Collision loss."""

__version__ = "0.1.0"

# Before anything starts JAX's CPU backend: XLA:CPU's faster convolution path for this processor
# (measured once and cached; DTL_JAX_CPU_CONV=off leaves XLA_FLAGS alone). dtl_jax/cpu_conv.py.
from dtl_jax import cpu_conv  # noqa: E402

cpu_conv.choose()

from dtl_jax.gc import gc_loss  # noqa: E402

__all__ = ["gc_loss", "__version__"]
