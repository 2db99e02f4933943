from .gate_metric import (CATEGORIES, GateMetric, gate_categories,
                          gate_open_counts, layer_categories, stage_of,
                          summarize_gate_records)

__all__ = ['CATEGORIES', 'GateMetric', 'gate_categories', 'gate_open_counts',
           'layer_categories', 'stage_of', 'summarize_gate_records']
