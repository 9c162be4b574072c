"""Weight converters from other implementations into cm3jax param pytrees."""
