"""Compiled operations (built on first use, with a PyTorch fallback)."""
from .gathered_gemm import (gathered_gemm, gathered_gemm_reference,
                            native_available)

__all__ = ['gathered_gemm', 'gathered_gemm_reference', 'native_available']
