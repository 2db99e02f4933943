from .macs import count_macs, dense_macs, gated_savings

__all__ = ['count_macs', 'dense_macs', 'gated_savings']
