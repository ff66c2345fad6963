"""The named configs, installed with the package as ``dtl_jax.configs``: ``dtl-jax run NAME`` reads
``NAME.py`` here, from a checkout or from any install. Each file defines ``get_config() -> Config``."""
