from .gate_metric import (GateMetric, gate_categories, stage_of,
                          summarize_gate_records)

__all__ = ['GateMetric', 'gate_categories', 'stage_of',
           'summarize_gate_records']
