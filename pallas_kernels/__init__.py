"""Pallas kernels for samba_jax's hot paths. Each kernel folder holds the backend-specific kernel
file and a wrapper with its custom VJP; nothing here imports samba_jax."""
