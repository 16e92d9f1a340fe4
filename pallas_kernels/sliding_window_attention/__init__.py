"""Flash-style sliding-window attention (Pallas; Triton backend on GPU, interpret mode on CPU)."""

from pallas_kernels.sliding_window_attention.sliding_window_attention import sliding_window_attention

__all__ = ["sliding_window_attention"]
