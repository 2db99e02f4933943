"""Compiled operations of skip execution (built on first use, with PyTorch
fallbacks)."""
from .gathered_conv import (direct_conv_fast, gathered_conv2d,
                            gathered_conv2d_reference, keeps_size)
from .gathered_gemm import gathered_gemm, gathered_gemm_reference
from .native import native_available

__all__ = [
    'direct_conv_fast', 'gathered_conv2d', 'gathered_conv2d_reference',
    'gathered_gemm', 'gathered_gemm_reference', 'keeps_size',
    'native_available'
]
