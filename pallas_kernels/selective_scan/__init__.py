"""Fused Mamba-1 selective scan (Pallas, Triton backend on GPU; interpret mode on CPU)."""

from pallas_kernels.selective_scan.selective_scan import selective_scan

__all__ = ["selective_scan"]
