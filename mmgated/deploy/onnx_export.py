"""Export a gated (or dense) model to ONNX and check it in onnxruntime.

The export traces mask execution: every channel is computed and the closed
ones are multiplied by their 0 gate, which ONNX expresses with standard
operators (the gate's ``logits > 0`` is a comparison and a cast). Skip
execution's data-dependent choice of channels has no static graph; a model
set to skip execution is exported in mask execution, with the same outputs.
"""
import contextlib
import warnings
from typing import Iterable

import numpy as np
import torch
import torch.nn as nn

from ..models import clear_gates, set_gate_execution


class TensorOutput(nn.Module):
    """The raw output tensor of an mmseg segmentor or mmpretrain classifier
    (``mode='tensor'``): class scores before softmax for a classifier, the
    decode head's logits (at its output stride) for a segmentor.

    Args:
        model (nn.Module): The model, in eval mode.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        out = self.model(inputs, mode='tensor')
        if isinstance(out, (tuple, list)):
            # mmpretrain heads may return a tuple of one tensor.
            out = out[-1]
        return out


@contextlib.contextmanager
def gate_records_exported(model: nn.Module):
    """Context for tracing ``model`` with ``torch.export`` (ONNX export):
    each gate keeps its last output on itself for ``collect_gates``, a side
    effect outside the graph that torch.export warns about once per gate.
    The warning is not shown, and the records of the traced (fake) batch
    are dropped on exit.

    Args:
        model (nn.Module): The model (or module holding the gates) that is
            exported.
    """
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings(
                'ignore',
                r'The tensor attributes .* were assigned during export')
            yield
    finally:
        clear_gates(model)


def export_onnx(model: nn.Module,
                example: torch.Tensor,
                path: str,
                opset: int = 18) -> bool:
    """Write ``model`` to ``path`` as ONNX with a dynamic batch axis.

    Args:
        model (nn.Module): An mmseg segmentor or mmpretrain classifier
            (gated or dense), on the CPU.
        example (Tensor): A preprocessed input ``(N, 3, H, W)``; H and W
            are fixed in the graph, the batch size is not.
        path (str): The ``.onnx`` file to write.
        opset (int): ONNX opset. Default: 18.

    Returns:
        bool: Whether the model was in skip execution and was exported in
        mask execution (the caller says so).
    """
    was_skip = any(
        getattr(block, 'gate_execution', None) == 'skip'
        for block in model.modules())
    if was_skip:
        set_gate_execution(model, 'mask')
    model.eval()
    batch = torch.export.Dim('batch', min=1, max=4096)
    with torch.no_grad(), gate_records_exported(model):
        torch.onnx.export(
            TensorOutput(model).eval(), (example, ),
            path,
            input_names=['inputs'],
            output_names=['outputs'],
            dynamic_shapes=({0: batch}, ),
            opset_version=opset,
            dynamo=True,
            verbose=False)
    return was_skip


def onnxruntime_difference(model: nn.Module, path: str,
                           inputs: Iterable[torch.Tensor]) -> float:
    """The largest absolute difference between the model's outputs in
    PyTorch and in onnxruntime (CPU) over some input batches.

    Args:
        model (nn.Module): The exported model, in eval mode.
        path (str): Its ``.onnx`` file.
        inputs (Iterable[Tensor]): Preprocessed input batches, of the
            exported height and width and any batch size.

    Returns:
        float: ``max |onnxruntime - PyTorch|`` over all outputs.
    """
    import onnxruntime
    session = onnxruntime.InferenceSession(
        path, providers=['CPUExecutionProvider'])
    wrapped = TensorOutput(model).eval()
    worst = 0.0
    with torch.no_grad():
        for x in inputs:
            expected = wrapped(x).float().numpy()
            actual = session.run(None, {'inputs': x.float().numpy()})[0]
            if actual.shape != expected.shape:
                raise AssertionError(
                    f'onnxruntime gave shape {actual.shape}, PyTorch '
                    f'{expected.shape}')
            worst = max(worst, float(np.abs(actual - expected).max()))
    return worst
