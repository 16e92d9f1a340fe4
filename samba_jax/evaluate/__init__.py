"""Long-context evaluation: `python -m samba_jax.evaluate TASK ...` (see __main__.py)."""
