from .compact import (compact_model, count_open_gates, open_rates_from_counts,
                      static_channels)
from .onnx_export import (TensorOutput, export_onnx, gate_records_exported,
                          onnxruntime_difference)

__all__ = [
    'TensorOutput', 'compact_model', 'count_open_gates', 'export_onnx',
    'gate_records_exported',
    'onnxruntime_difference', 'open_rates_from_counts', 'static_channels'
]
