"""MAC accounting, gate statistics and the paper's plots of gated networks.

:mod:`.plots` (matplotlib) and :mod:`.gate_stats` are imported on use.
"""
from .macs import (MacCounter, analyzer_macs, aux_heads, block_gate_overhead,
                   count_macs, dense_macs, gated_savings, savings_from_counts)

__all__ = [
    'MacCounter', 'analyzer_macs', 'aux_heads', 'block_gate_overhead',
    'count_macs', 'dense_macs', 'gated_savings', 'savings_from_counts'
]
