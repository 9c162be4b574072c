from cm3jax.cli import run

run()
