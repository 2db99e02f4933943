"""Compiled operations (built on first use, with PyTorch fallbacks)."""
from .batch_shaping import beta_cdf_pdf, sort_columns
from .gate_logits import gate_logits, gate_logits_reference
from .gathered_conv import (direct_conv_fast, gathered_conv2d,
                            gathered_conv2d_reference, keeps_size)
from .gathered_gemm import gathered_gemm, gathered_gemm_reference
from .native import native_available

__all__ = [
    'beta_cdf_pdf', 'direct_conv_fast', 'gate_logits', 'gate_logits_reference',
    'gathered_conv2d', 'gathered_conv2d_reference', 'gathered_gemm',
    'gathered_gemm_reference', 'keeps_size', 'native_available',
    'sort_columns'
]
