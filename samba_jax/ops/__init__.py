"""Pure-JAX ops with stable signatures; each picks an implementation by name (`implementation=`)."""

from samba_jax.ops.attention import sliding_window_attention, sliding_window_attention_decode
from samba_jax.ops.selective_scan import selective_scan, selective_scan_step

__all__ = ["selective_scan", "selective_scan_step", "sliding_window_attention", "sliding_window_attention_decode"]
