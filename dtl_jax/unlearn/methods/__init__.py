"""One file a method; each registers itself with ``dtl_jax.unlearn.registry.register``."""
