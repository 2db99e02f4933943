from .onnx_export import TensorOutput, export_onnx, onnxruntime_difference

__all__ = ['TensorOutput', 'export_onnx', 'onnxruntime_difference']
