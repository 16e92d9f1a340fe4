"""samba_jax: Samba language models in JAX. `samba_jax.load(path)` gives a trained model as a callable."""


def load(path: str, step: int | None = None):
    """A model from a training workdir or an export: `model(ids (batch, seq))` -> float32 logits.

    See samba_jax/export.py for the formats.
    """
    from samba_jax.export import load as _load

    return _load(path, step)
