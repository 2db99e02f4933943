"""GateMetric and the gate statistics behind it."""
import numpy as np
import pytest
import torch
from mmengine.config import ConfigDict
from mmengine.evaluator import Evaluator
from mmengine.registry import init_default_scope

import mmgated  # noqa: F401
from mmgated.analysis import MacCounter, count_macs
from mmgated.evaluation import (GateMetric, gate_categories,
                                gate_open_counts, layer_categories, stage_of,
                                summarize_gate_records)
from mmgated.models import force_gates, gate_modules

N = 200


def bind(evaluator, model):
    """What GateMetricHook does before a validation."""
    for metric in evaluator.metrics:
        if isinstance(metric, GateMetric):
            metric.mac_counter = MacCounter(model)


def synthetic_records():
    """200 samples, two gate modules with known open counts per channel.

    layer1.0.gate: open 200, 199 (99.5 %), 198 (99 %: not *more* than 99 %)
    and 2 times (closed 99 %); layer2.0.gate: open once (closed 99.5 %) and
    100 times.
    """
    open_counts = {
        'backbone.layer1.0.gate': [200, 199, 198, 2],
        'backbone.layer2.0.gate': [1, 100],
    }
    rng = np.random.default_rng(0)
    columns = {}
    for name, counts in open_counts.items():
        cols = []
        for k in counts:
            col = np.zeros(N, dtype=bool)
            col[rng.permutation(N)[:k]] = True
            cols.append(col)
        columns[name] = np.stack(cols, 1)
    macs = 50.0 + 50.0 * rng.random(N)
    records = [
        dict(
            gate_open={name: torch.from_numpy(c[i])
                       for name, c in columns.items()},
            conditional_macs=float(macs[i]),
            dense_macs=100.0) for i in range(N)
    ]
    return records, macs / 100.0


def test_gate_categories_threshold_is_strict():
    rates = np.array([1.0, 0.995, 0.99, 0.5, 0.01, 0.005, 0.0])
    cats = gate_categories(rates, 0.99)
    assert cats['always_on'].tolist() == [1, 1, 0, 0, 0, 0, 0]
    assert cats['always_off'].tolist() == [0, 0, 0, 0, 0, 1, 1]
    assert cats['conditional'].tolist() == [0, 0, 1, 1, 1, 0, 0]
    # Off for exactly 99 of 100 inputs is not "more than 99 %", although
    # 1 - 0.01 is not the float 0.99; the exact closed rate decides.
    cats = gate_categories(np.array([1 / 100]), 0.99, np.array([99 / 100]))
    assert cats['conditional'].tolist() == [True]
    for bad in (0.4, 1.0, 'x', True):
        with pytest.raises(ValueError, match='threshold'):
            gate_categories(rates, bad)


def test_summarize_synthetic_records():
    records, ratios = synthetic_records()
    metrics = summarize_gate_records(records)
    assert metrics['mac_ratio'] == pytest.approx(ratios.mean())
    assert metrics['mac_ratio_std'] == pytest.approx(ratios.std())
    assert metrics['mac_ratio_min'] == pytest.approx(ratios.min())
    assert metrics['mac_ratio_max'] == pytest.approx(ratios.max())
    assert metrics['mean_macs'] == pytest.approx(100 * ratios.mean())
    assert metrics['dense_macs'] == 100.0
    assert metrics['gate_open_rate'] == pytest.approx(
        (200 + 199 + 198 + 2 + 1 + 100) / (6 * N))
    # on: 200, 199; off: 1; conditional: 198, 2, 100.
    assert metrics['gates_always_on'] == pytest.approx(2 / 6)
    assert metrics['gates_always_off'] == pytest.approx(1 / 6)
    assert metrics['gates_conditional'] == pytest.approx(3 / 6)
    assert metrics['layer1/gates_always_on'] == 0.5
    assert metrics['layer1/gates_conditional'] == 0.5
    assert metrics['layer1/gates_always_off'] == 0.0
    assert metrics['layer2/gates_always_on'] == 0.0
    assert metrics['layer2/gates_conditional'] == 0.5
    assert metrics['layer2/gates_always_off'] == 0.5
    # A looser threshold moves 198/200 to always on.
    assert summarize_gate_records(records, 0.985)['gates_always_on'] == \
        pytest.approx(3 / 6)


def test_per_layer_categories_and_counts():
    records, _ = synthetic_records()
    counts, n = gate_open_counts(records)
    assert n == N
    assert counts['backbone.layer1.0.gate'].tolist() == [200, 199, 198, 2]
    layers = layer_categories(counts, n)
    assert list(layers) == ['backbone.layer1.0.gate', 'backbone.layer2.0.gate']
    assert layers['backbone.layer2.0.gate'] == dict(
        num_gates=2, open_rate=101 / 400, always_on=0.0, conditional=0.5,
        always_off=0.5)
    assert stage_of('backbone.layer3.2.gate2') == 'layer3'
    assert stage_of('gate') == 'other'


def test_summarize_errors():
    with pytest.raises(ValueError, match='no gate records'):
        summarize_gate_records([])
    records, _ = synthetic_records()
    records[5] = dict(records[5], gate_open={'backbone.layer1.0.gate':
                                             torch.ones(4)})
    with pytest.raises(ValueError, match='gate record 5'):
        summarize_gate_records(records)


def test_metric_process_and_prefix():
    """process() keeps each sample's gate record; compute_metrics counts
    its MACs with the counter the hook set (a stand-in here that returns
    the synthetic figures)."""
    records, ratios = synthetic_records()
    metric = GateMetric()
    samples = [
        dict(gate_open=r['gate_open'], gate_input_sizes={'any': (4, 4)},
             model_input_shape=(3, 8, 8), index=i,
             pred_label=torch.tensor([0])) for i, r in enumerate(records)
    ]
    samples.append(dict(pred_label=torch.tensor([1])))  # no gate record
    metric.process({}, samples)
    assert len(metric.results) == N
    assert metric.results[0]['gate_open']['backbone.layer1.0.gate'].dtype \
        == bool
    with pytest.raises(RuntimeError, match='GateMetricHook'):
        metric.compute_metrics(metric.results)
    macs = iter(records)

    def counter(record):
        expected = next(macs)
        for name, value in expected['gate_open'].items():
            assert np.array_equal(record['gate_open'][name], value.numpy())
        return dict(conditional_macs=expected['conditional_macs'],
                    dense_macs=expected['dense_macs'])

    metric.mac_counter = counter
    results = metric.evaluate(N)
    assert results['gates/mac_ratio'] == pytest.approx(ratios.mean())
    assert results['gates/layer2/gates_always_off'] == 0.5
    with pytest.raises(ValueError, match='threshold'):
        GateMetric(threshold=1.5)


def test_hook_gives_the_metric_its_model():
    from types import SimpleNamespace

    from mmgated.analysis import MacCounter
    from mmgated.engine import GateMetricHook
    model = torch.nn.Linear(2, 2)
    metric, other = GateMetric(), object()
    evaluator = SimpleNamespace(metrics=[other, metric])
    runner = SimpleNamespace(model=model,
                             val_loop=SimpleNamespace(evaluator=evaluator),
                             test_loop=None)
    hook = GateMetricHook()
    hook.before_test(runner)  # no test loop: nothing to bind
    assert metric.mac_counter is None
    hook.before_val(runner)
    assert isinstance(metric.mac_counter, MacCounter)
    assert metric.mac_counter.model is model


# ----------------------------------------------------------------------------
# Inside a validation step of mmseg and of mmpretrain
# ----------------------------------------------------------------------------
EXPECTED_KEYS = {
    'gates/mac_ratio', 'gates/mac_ratio_std', 'gates/mac_ratio_min',
    'gates/mac_ratio_max', 'gates/mean_macs', 'gates/dense_macs',
    'gates/gate_open_rate', 'gates/gates_always_on', 'gates/gates_conditional',
    'gates/gates_always_off'
}


def stage_keys(stages):
    return {f'gates/{s}/gates_{c}' for s in stages
            for c in ('always_on', 'conditional', 'always_off')}


def seg_model_cfg():
    norm = dict(type='BN', requires_grad=True)
    return dict(
        type='GatedEncoderDecoder',
        data_preprocessor=dict(
            type='SegDataPreProcessor', mean=[123.675, 116.28, 103.53],
            std=[58.395, 57.12, 57.375], bgr_to_rgb=True, pad_val=0,
            seg_pad_val=255, size=(64, 64)),
        backbone=dict(
            type='GatedResNetV1c', depth=18, base_channels=8, stem_channels=8,
            dilations=(1, 1, 2, 4), strides=(1, 2, 1, 1), norm_cfg=norm,
            contract_dilation=True),
        decode_head=dict(
            type='PSPHead', in_channels=64, in_index=3, channels=16,
            pool_scales=(1, 2, 3, 6), num_classes=4, norm_cfg=norm,
            align_corners=False,
            loss_decode=dict(type='CrossEntropyLoss', loss_weight=1.0)),
        train_cfg=ConfigDict(),
        test_cfg=ConfigDict(mode='whole'))


def test_metric_in_mmseg_validation():
    init_default_scope('mmseg')
    from mmengine.structures import PixelData
    from mmseg.registry import MODELS
    from mmseg.structures import SegDataSample
    torch.manual_seed(0)
    model = MODELS.build(seg_model_cfg())
    model.eval()
    g = torch.Generator().manual_seed(0)
    images, samples = [], []
    for i in range(3):
        images.append(torch.randint(0, 256, (3, 64, 64), dtype=torch.uint8,
                                    generator=g))
        sample = SegDataSample(metainfo=dict(
            img_shape=(64, 64), ori_shape=(64, 64), img_path=f'{i}.png'))
        sample.gt_sem_seg = PixelData(
            data=torch.randint(0, 4, (1, 64, 64), generator=g))
        samples.append(sample)
    batch = dict(inputs=images, data_samples=samples)
    evaluator = Evaluator([dict(type='IoUMetric'), dict(type='GateMetric')])
    evaluator.dataset_meta = dict(classes=('a', 'b', 'c', 'd'))
    bind(evaluator, model)
    with force_gates(model, 0.5, seed=0):
        outputs = model.val_step(batch)
    evaluator.process(outputs, batch)
    metrics = evaluator.evaluate(3)
    assert 'mIoU' in metrics
    assert EXPECTED_KEYS | stage_keys(['layer1', 'layer2', 'layer3',
                                       'layer4']) <= set(metrics)
    counter = MacCounter(model)
    ratios = [counter(o.metainfo)['conditional_macs'] /
              counter(o.metainfo)['dense_macs'] for o in outputs]
    assert metrics['gates/mac_ratio'] == pytest.approx(np.mean(ratios))
    assert metrics['gates/mac_ratio_std'] == pytest.approx(np.std(ratios))
    assert 0.1 < metrics['gates/mac_ratio'] < 0.9
    # Three samples, gates open at random: none is on or off for > 99 %
    # unless it was open (closed) for all three.
    assert metrics['gates/gate_open_rate'] == pytest.approx(0.5, abs=0.05)

    # All open: the ratio is that of count_macs, (dense + gating) / dense.
    with force_gates(model, True):
        outputs = model.val_step(batch)
        reference = count_macs(model, model.data_preprocessor(
            batch, False)['inputs'])
    evaluator.process(outputs, batch)
    metrics = evaluator.evaluate(3)
    assert metrics['gates/mac_ratio'] == pytest.approx(
        reference['ratio'][0].item())
    assert metrics['gates/dense_macs'] == reference['dense']
    assert metrics['gates/gates_always_on'] == 1.0
    assert metrics['gates/mac_ratio_std'] == 0.0


def cls_model_cfg():
    return dict(
        type='GatedImageClassifier',
        # No type: ImageClassifier fills in mmpretrain's, as in the configs.
        data_preprocessor=dict(
            num_classes=3,
            mean=[125.307, 122.961, 113.8575], std=[51.5865, 50.847, 51.255]),
        backbone=dict(type='GatedResNetCifar', depth=20),
        neck=dict(type='GlobalAveragePooling'),
        head=dict(type='LinearClsHead', num_classes=3, in_channels=64,
                  loss=dict(type='CrossEntropyLoss')))


def test_metric_in_mmpretrain_validation():
    init_default_scope('mmpretrain')
    from mmpretrain.registry import MODELS
    from mmpretrain.structures import DataSample
    torch.manual_seed(0)
    model = MODELS.build(cls_model_cfg())
    model.eval()
    # Spread the logits so that the learned gates differ between inputs.
    for gate in gate_modules(model).values():
        torch.nn.init.normal_(gate.fc2.weight, std=2.0)
        torch.nn.init.zeros_(gate.fc2.bias)
    g = torch.Generator().manual_seed(0)
    images = [torch.randint(0, 256, (3, 32, 32), dtype=torch.uint8,
                            generator=g) for _ in range(4)]
    samples = [DataSample().set_gt_label(i % 3) for i in range(4)]
    batch = dict(inputs=images, data_samples=samples)
    evaluator = Evaluator([dict(type='Accuracy', topk=(1, )),
                           dict(type='GateMetric', threshold=0.9)])
    bind(evaluator, model)
    outputs = model.val_step(batch)
    evaluator.process(outputs, batch)
    metrics = evaluator.evaluate(4)
    assert 'accuracy/top1' in metrics
    assert EXPECTED_KEYS | stage_keys(['layer1', 'layer2', 'layer3']) <= set(
        metrics)
    assert not any(k.startswith('gates/layer4') for k in metrics)
    inputs = model.data_preprocessor(batch, False)['inputs']
    reference = count_macs(model, inputs)
    assert metrics['gates/mac_ratio'] == pytest.approx(
        reference['ratio'].mean().item())
    assert metrics['gates/mac_ratio_std'] == pytest.approx(
        reference['ratio'].std(unbiased=False).item())
    assert metrics['gates/mac_ratio'] < 1.0
    for key in ('always_on', 'conditional', 'always_off'):
        assert 0 <= metrics[f'gates/gates_{key}'] <= 1
    assert sum(metrics[f'gates/gates_{k}'] for k in
               ('always_on', 'conditional', 'always_off')) == pytest.approx(1)
