"""ONNX export (tools/deploy/export_onnx.py) checked in onnxruntime."""
import numpy as np
import onnxruntime
import pytest
import torch

from data_utils import (CIFAR_AS_FOLDER_TINY_SETTINGS, SEG_TINY_SETTINGS,
                        load_script, write_tiny_config)
from mmgated.analysis.inference import build_model
from mmgated.deploy import TensorOutput
from mmgated.models import collect_gates, gate_modules
from mmgated.utils.checkpoint_io import add_checksum
from mmgated.utils.outputs import OutputExistsError
from mmgated.utils.run_config import load_run_config

export_tool = load_script('tools/deploy/export_onnx.py')
pytestmark = pytest.mark.usefixtures('one_thread')


def _gated_checkpoint(config, path):
    """A checkpoint of ``config``'s model whose gates are open for some
    inputs and closed for others (the initial ones are all open)."""
    model = build_model(load_run_config(config))
    torch.manual_seed(0)
    for gate in gate_modules(model).values():
        gate.fc2.bias.data = torch.randn_like(gate.fc2.bias) * 2
    checkpoint = dict(state_dict=model.state_dict(), meta={})
    add_checksum(checkpoint)
    torch.save(checkpoint, path)
    return model


@pytest.fixture(scope='module')
def cls_model(tiny_imagenet, tmp_path_factory):
    folder = tmp_path_factory.mktemp('export_cls')
    config = write_tiny_config(folder / 'r20.py',
                               'configs/resnet20_bas_cifar10.py',
                               CIFAR_AS_FOLDER_TINY_SETTINGS, tiny_imagenet)
    checkpoint = str(folder / 'r20.pth')
    return config, checkpoint, _gated_checkpoint(config, checkpoint)


def test_classifier_export_matches_pytorch(cls_model, tmp_path, capsys):
    config, checkpoint, model = cls_model
    out = str(tmp_path / 'r20.onnx')
    export_tool.main([config, checkpoint, '--out', out])
    assert 'and 4 test images: max |difference|' in capsys.readouterr().out
    # Our own comparison, at a batch size the export did not trace, on
    # inputs whose gates differ between samples.
    x = torch.randn(5, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = TensorOutput(model.eval())(x).numpy()
    open_rate = torch.cat([g.gates for g in collect_gates(model).values()],
                          1).mean()
    assert 0.1 < float(open_rate) < 0.9
    session = onnxruntime.InferenceSession(out)
    actual = session.run(None, {'inputs': x.numpy()})[0]
    np.testing.assert_allclose(actual, expected, atol=1e-4, rtol=0)


def test_skip_execution_is_exported_in_mask_execution(cls_model, tmp_path,
                                                      capsys):
    config, checkpoint, _ = cls_model
    out = str(tmp_path / 'skip.onnx')
    export_tool.main([
        config, checkpoint, '--out', out, '--check-samples', '0', '--shape',
        '32', '32', '--cfg-options', 'model.backbone.gate_cfg.execution=skip'
    ])
    printed = capsys.readouterr().out
    assert 'exported in mask execution' in printed
    assert 'on a random batch: max |difference|' in printed


def test_export_leaves_no_gate_records_and_no_warnings(cls_model, tmp_path):
    """The gates' records of the traced batch are dropped, and torch.export's
    warning about them (one per gate) is not shown to the user."""
    import warnings

    from mmgated.deploy import export_onnx
    _, _, model = cls_model
    with torch.no_grad():
        model.eval()(torch.randn(2, 3, 32, 32), mode='tensor')
    assert collect_gates(model)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        export_onnx(model, torch.randn(2, 3, 32, 32),
                    str(tmp_path / 'm.onnx'))
    assert not [str(w.message) for w in caught
                if 'assigned during export' in str(w.message)]
    assert collect_gates(model) == {}


def test_existing_out_needs_force(cls_model, tmp_path):
    config, checkpoint, _ = cls_model
    out = tmp_path / 'taken.onnx'
    out.write_bytes(b'a model of someone')
    with pytest.raises(OutputExistsError, match='--force'):
        export_tool.main([config, checkpoint, '--out', str(out)])
    assert out.read_bytes() == b'a model of someone'


def test_segmentor_export_matches_pytorch(tiny_cityscapes, tmp_path, capsys):
    config = write_tiny_config(tmp_path / 'psp.py',
                               'configs/pspnet_gated_r50_cityscapes.py',
                               SEG_TINY_SETTINGS, tiny_cityscapes)
    checkpoint = str(tmp_path / 'psp.pth')
    _gated_checkpoint(config, checkpoint)
    export_tool.main([config, checkpoint, '--out', str(tmp_path / 'p.onnx'),
                      '--check-samples', '1'])
    printed = capsys.readouterr().out
    difference = float(printed.split('max |difference| ')[1].split()[0])
    assert difference <= 1e-4
