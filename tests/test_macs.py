"""MAC accounting of gated networks (mmgated.analysis.macs).

The expected figures are computed in the tests from the layer shapes of the
architectures, independently of ``Block.gated_convs`` and of the analyzer:
a k x k convolution from ``cin`` to ``cout`` channels at an output of
``H x W`` costs ``cin * cout * k * k * H * W`` MACs, an eval-mode BatchNorm
2 per element (mmengine's convention), a gating module its pooling
(``cin * H_in * W_in``) plus ``cin * 16 + 2 * 16 + 16 * c``.
"""
import pytest
import torch
from mmengine.analysis import FlopAnalyzer
from mmengine.config import ConfigDict
from mmengine.registry import init_default_scope

import mmgated  # noqa: F401
from mmgated.analysis import (MacCounter, analyzer_macs, block_gate_overhead,
                              count_macs, dense_macs, gated_savings)
from mmgated.models import (GatedResNetCifar, ResNetCifar, collect_gates,
                            force_gates, gate_modules)

HIDDEN = 16  # gating module width (paper)


def analyzer_total(model, inputs):
    model.eval()  # mmpretrain's ResNet.train() returns None: no chaining
    analyzer = FlopAnalyzer(model, (inputs, ))
    analyzer.unsupported_ops_warnings(False)
    analyzer.uncalled_modules_warnings(False)
    return analyzer.total() / inputs.shape[0]


# ----------------------------------------------------------------------------
# Hand counts of the CIFAR ResNet (depth 6n + 2, 16/32/64 channels)
# ----------------------------------------------------------------------------
def cifar_blocks(depth=20, size=32):
    """``(name, cin, c, stride, h_in)`` of every block of ResNetCifar."""
    n = (depth - 2) // 6
    blocks, cin, h = [], 16, size
    for stage, (c, stride) in enumerate(((16, 1), (32, 2), (64, 2))):
        for i in range(n):
            s = stride if i == 0 else 1
            blocks.append((f'layer{stage + 1}.{i}.gate', cin, c, s, h))
            cin, h = c, h // s
    return blocks


def cifar_dense(depth=20, size=32):
    """Dense MACs of ResNetCifar by hand (convs + 2/element BN)."""
    total = 3 * 16 * 9 * size * size + 2 * 16 * size * size  # stem
    for _, cin, c, s, h in cifar_blocks(depth, size):
        ho = h // s
        total += cin * c * 9 * ho * ho + 2 * c * ho * ho  # conv1, bn1
        total += c * c * 9 * ho * ho + 2 * c * ho * ho  # conv2, bn2
        if s != 1 or cin != c:
            total += cin * c * ho * ho + 2 * c * ho * ho  # downsample
    return total


def cifar_gating(depth=20, size=32):
    return sum(cin * h * h + cin * HIDDEN + 2 * HIDDEN + HIDDEN * c
               for _, cin, c, s, h in cifar_blocks(depth, size))


def cifar_conditional(open_counts, depth=20, size=32):
    """Conditional MACs of one sample of GatedResNetCifar by hand.

    Args:
        open_counts (dict): Block gate name (``'layer1.0.gate'``) to the
            number of open channels.
    """
    total = cifar_dense(depth, size) + cifar_gating(depth, size)
    for name, cin, c, s, h in cifar_blocks(depth, size):
        ho = h // s
        k = open_counts[name]
        # conv1 filters, bn1 channels and conv2 input slices of closed
        # channels are skipped.
        total -= (c - k) * (cin * 9 * ho * ho + 2 * ho * ho + c * 9 * ho * ho)
    return total


def short(name):
    return name[len('backbone.'):] if name.startswith('backbone.') else name


def patch_patterns(monkeypatch, model, patterns):
    """Make every gate apply ``patterns[name]`` (an ``(N, C)`` 0/1 tensor)."""
    for name, gate in gate_modules(model).items():
        mask = patterns[name]
        monkeypatch.setattr(gate, 'forced', True)
        monkeypatch.setattr(
            gate, '_forced_gates',
            lambda logits, mask=mask: mask[:logits.shape[0]].to(logits))


def make_patterns(model, n, seed=0):
    """Known gate patterns with 0, all and in-between open channels."""
    g = torch.Generator().manual_seed(seed)
    patterns = {}
    for j, (name, gate) in enumerate(gate_modules(model).items()):
        c = gate.out_channels
        rows = []
        for i in range(n):
            k = [0, c, (3 * i + j) % (c + 1)][(i + j) % 3]
            row = torch.zeros(c)
            row[torch.randperm(c, generator=g)[:k]] = 1
            rows.append(row)
        patterns[name] = torch.stack(rows)
    return patterns


@pytest.fixture(scope='module')
def resnet20():
    torch.manual_seed(0)
    model = GatedResNetCifar(depth=20)
    model.eval()
    return model


@pytest.fixture(scope='module')
def cifar_inputs():
    generator = torch.Generator().manual_seed(1)
    return torch.randn(3, 3, 32, 32, generator=generator)


def test_hand_counts_match_analyzer(cifar_inputs):
    # The hand count itself is right: it is the analyzer's figure of the
    # dense network.
    dense = ResNetCifar(depth=20)
    assert analyzer_total(dense, cifar_inputs) == cifar_dense()


def test_dense_matches_dense_counterpart(resnet20, cifar_inputs):
    result = count_macs(resnet20, cifar_inputs)
    reference = analyzer_total(ResNetCifar(depth=20), cifar_inputs)
    assert abs(result['dense'] - reference) / reference < 0.01
    assert result['dense'] == reference
    assert result['gating'] == cifar_gating()
    assert set(result) == {'dense', 'gating', 'per_sample', 'ratio'}
    assert result['per_sample'].shape == (3, )


def test_forced_open_is_dense_plus_gating(resnet20, cifar_inputs):
    with force_gates(resnet20, True):
        result = count_macs(resnet20, cifar_inputs)
    expected = result['dense'] + result['gating']
    assert torch.equal(result['per_sample'],
                       torch.full((3, ), expected, dtype=torch.float64))
    assert torch.allclose(result['ratio'],
                          torch.tensor(expected / result['dense']).double())


def test_forced_closed_by_hand(resnet20, cifar_inputs):
    with force_gates(resnet20, False):
        result = count_macs(resnet20, cifar_inputs)
    # What is left: stem, downsample shortcuts, bn2 of every block, gates.
    left = 3 * 16 * 9 * 32 * 32 + 2 * 16 * 32 * 32
    left += 16 * 32 * 16 * 16 + 2 * 32 * 16 * 16  # layer2.0 downsample
    left += 32 * 64 * 8 * 8 + 2 * 64 * 8 * 8  # layer3.0 downsample
    left += 3 * 2 * 16 * 32 * 32 + 3 * 2 * 32 * 16 * 16 + 3 * 2 * 64 * 8 * 8
    left += cifar_gating()
    assert left == cifar_conditional(
        {name: 0 for name, *_ in cifar_blocks()})
    assert result['per_sample'].tolist() == [left] * 3


def test_known_patterns_by_hand(resnet20, cifar_inputs, monkeypatch):
    patterns = make_patterns(resnet20, 3)
    patch_patterns(monkeypatch, resnet20, patterns)
    result = count_macs(resnet20, cifar_inputs)
    for i in range(3):
        counts = {short(k): int(v[i].sum()) for k, v in patterns.items()}
        assert result['per_sample'][i].item() == cifar_conditional(counts)
    assert torch.allclose(result['ratio'],
                          result['per_sample'] / result['dense'])
    assert len(set(result['per_sample'].tolist())) == 3


def test_random_forced_patterns_by_hand(resnet20, cifar_inputs):
    with force_gates(resnet20, 0.5, seed=3):
        result = count_macs(resnet20, cifar_inputs)
        recorded = collect_gates(resnet20)
    for i in range(3):
        counts = {short(k): int(v.gates[i].sum()) for k, v in recorded.items()}
        assert result['per_sample'][i].item() == cifar_conditional(counts)


def test_learned_gates_in_eval_mode(cifar_inputs):
    # Gates from the model's own logits (no forcing): some closed.
    torch.manual_seed(0)
    model = GatedResNetCifar(depth=20)
    for gate in gate_modules(model).values():
        torch.nn.init.normal_(gate.fc2.weight, std=2.0)
        torch.nn.init.zeros_(gate.fc2.bias)
    model.train()
    result = count_macs(model, cifar_inputs)
    assert model.training, 'count_macs must restore the training mode'
    recorded = collect_gates(model)
    for i in range(3):
        counts = {short(k): int(v.gates[i].sum()) for k, v in recorded.items()}
        assert 0 < sum(counts.values()) < sum(
            c for _, _, c, _, _ in cifar_blocks())
        assert result['per_sample'][i].item() == cifar_conditional(counts)


def test_skip_execution_counts_as_mask(cifar_inputs, monkeypatch):
    # In 'skip' execution the analyzer would see only the open channels of
    # the traced batch; count_macs must still report the dense network.
    from mmgated.models.skip_execution import set_gate_execution
    torch.manual_seed(0)
    model = GatedResNetCifar(depth=20)
    model.eval()
    patterns = make_patterns(model, 3, seed=7)
    patch_patterns(monkeypatch, model, patterns)
    masked = count_macs(model, cifar_inputs)
    set_gate_execution(model, 'skip')
    skipped = count_macs(model, cifar_inputs)
    assert skipped['dense'] == masked['dense'] == cifar_dense()
    assert torch.equal(skipped['per_sample'], masked['per_sample'])
    assert all(block.gate_execution == 'skip' for block in model.modules()
               if hasattr(block, 'gate_execution') and block.gated)


# ----------------------------------------------------------------------------
# Bottleneck blocks and the three gate positions (mmseg ResNetV1c-50, tiny)
# ----------------------------------------------------------------------------
def bottleneck_cfg(gated, position='after_conv2'):
    cfg = dict(
        type='GatedResNetV1c' if gated else 'ResNetV1c',
        depth=50,
        base_channels=8,
        stem_channels=8,
        strides=(1, 2, 1, 1),
        dilations=(1, 1, 2, 4),
        out_indices=(0, 1, 2, 3),
        contract_dilation=True)
    if gated:
        cfg['gate_cfg'] = dict(position=position)
    return cfg


def bottleneck_conditional(model, open1, open2, dense):
    """Conditional MACs by hand from the block shapes (pytorch style: the
    stride sits in conv2, conv1 runs at the input resolution).

    Args:
        open1 (dict): Block name to open channels of gate1 (or None).
        open2 (dict): Block name to open channels of gate2 (or None).
    """
    total = dense
    for name, block in model.named_modules():
        if type(block).__name__ != 'GatedBottleneck':
            continue
        cin, p = block.conv1.in_channels, block.conv1.out_channels
        h1, w1 = block._in_size
        s = block.conv2.stride[0]
        h2, w2 = (h1 + s - 1) // s, (w1 + s - 1) // s
        full = dict(
            conv1=cin * p * h1 * w1, bn1=2 * p * h1 * w1,
            conv2=p * p * 9 * h2 * w2, bn2=2 * p * h2 * w2,
            conv3=p * 4 * p * h2 * w2)
        k1 = open1.get(name, p)
        k2 = open2.get(name, p)
        part = dict(
            conv1=cin * k1 * h1 * w1, bn1=2 * k1 * h1 * w1,
            conv2=k1 * k2 * 9 * h2 * w2, bn2=2 * k2 * h2 * w2,
            conv3=k2 * 4 * p * h2 * w2)
        total -= sum(full.values()) - sum(part.values())
        for g in ('gate1', 'gate2'):
            if hasattr(block, g):
                gate = getattr(block, g)
                total += (cin * h1 * w1 + cin * HIDDEN + 2 * HIDDEN
                          + HIDDEN * gate.out_channels)
    return total


@pytest.mark.parametrize('position', ['after_conv1', 'after_conv2', 'both'])
def test_bottleneck_positions_by_hand(position, monkeypatch):
    init_default_scope('mmseg')
    from mmseg.registry import MODELS
    torch.manual_seed(0)
    model = MODELS.build(bottleneck_cfg(True, position))
    dense_model = MODELS.build(bottleneck_cfg(False))
    model.eval()
    inputs = torch.randn(2, 3, 64, 64)
    # Record each block's input size for the hand count.
    for block in model.modules():
        if type(block).__name__ == 'GatedBottleneck':
            block.register_forward_pre_hook(
                lambda m, args: setattr(m, '_in_size',
                                        tuple(args[0].shape[2:])))
    patterns = make_patterns(model, 2, seed=5)
    patch_patterns(monkeypatch, model, patterns)
    result = count_macs(model, inputs)
    reference = analyzer_total(dense_model, inputs)
    assert result['dense'] == reference
    for i in range(2):
        open1, open2 = {}, {}
        for name, mask in patterns.items():
            block, gate = name.rsplit('.', 1)
            (open1 if gate == 'gate1' else open2)[block] = int(mask[i].sum())
        expected = bottleneck_conditional(model, open1, open2, reference)
        assert result['per_sample'][i].item() == expected, position


# ----------------------------------------------------------------------------
# Classifier and segmentor
# ----------------------------------------------------------------------------
def classifier_cfg(gated):
    return dict(
        type='GatedImageClassifier' if gated else 'ImageClassifier',
        backbone=dict(
            type='GatedResNetCifar' if gated else 'ResNetCifar', depth=20),
        neck=dict(type='GlobalAveragePooling'),
        head=dict(
            type='LinearClsHead', num_classes=10, in_channels=64,
            loss=dict(type='CrossEntropyLoss')))


def test_classifier(cifar_inputs, monkeypatch):
    init_default_scope('mmpretrain')
    from mmpretrain.registry import MODELS
    model = MODELS.build(classifier_cfg(True))
    model.eval()
    reference = analyzer_total(MODELS.build(classifier_cfg(False)),
                               cifar_inputs)
    head = 64 * 8 * 8 + 64 * 10  # GAP (1 per element) and the FC layer
    assert reference == cifar_dense() + head
    with force_gates(model, True):
        result = count_macs(model, cifar_inputs)
    assert abs(result['dense'] - reference) / reference < 0.01
    assert result['dense'] == reference
    assert 'aux_head' not in result
    assert result['per_sample'].tolist() == [reference + cifar_gating()] * 3
    patterns = make_patterns(model, 3, seed=2)
    patch_patterns(monkeypatch, model, patterns)
    result = count_macs(model, cifar_inputs)
    for i in range(3):
        counts = {short(k): int(v[i].sum()) for k, v in patterns.items()}
        assert result['per_sample'][i].item() == cifar_conditional(
            counts) + head
    # The records predict() attaches count as count_macs does.
    from mmpretrain.structures import DataSample
    samples = model.predict(cifar_inputs, [DataSample() for _ in range(3)])
    counter = MacCounter(model)
    for i, sample in enumerate(samples):
        counted = counter(sample.metainfo)
        assert counted['dense_macs'] == reference
        assert counted['conditional_macs'] == result['per_sample'][i].item()


def segmentor_cfg(gated):
    norm = dict(type='BN', requires_grad=True)
    return dict(
        type='GatedEncoderDecoder' if gated else 'EncoderDecoder',
        data_preprocessor=dict(type='SegDataPreProcessor', size=(64, 64)),
        backbone=dict(
            type='GatedResNetV1c' if gated else 'ResNetV1c',
            depth=18, base_channels=8, stem_channels=8,
            dilations=(1, 1, 2, 4), strides=(1, 2, 1, 1),
            out_indices=(0, 1, 2, 3), norm_cfg=norm, contract_dilation=True),
        decode_head=dict(
            type='PSPHead', in_channels=64, in_index=3, channels=16,
            pool_scales=(1, 2, 3, 6), num_classes=5, norm_cfg=norm,
            align_corners=False,
            loss_decode=dict(type='CrossEntropyLoss', loss_weight=1.0)),
        auxiliary_head=dict(
            type='FCNHead', in_channels=32, in_index=2, channels=8,
            num_convs=1, concat_input=False, num_classes=5, norm_cfg=norm,
            align_corners=False,
            loss_decode=dict(type='CrossEntropyLoss', loss_weight=0.4)),
        train_cfg=ConfigDict(),
        test_cfg=ConfigDict(mode='whole'))


def test_segmentor(monkeypatch):
    init_default_scope('mmseg')
    from mmseg.registry import MODELS
    torch.manual_seed(0)
    model = MODELS.build(segmentor_cfg(True))
    dense_model = MODELS.build(segmentor_cfg(False))
    model.eval()
    dense_model.eval()
    inputs = torch.randn(2, 3, 64, 64)
    reference = analyzer_total(dense_model, inputs)
    with force_gates(model, True):
        result = count_macs(model, inputs)
    assert abs(result['dense'] - reference) / reference < 0.01
    assert result['dense'] == reference
    expected_open = reference + result['gating']
    assert result['per_sample'].tolist() == [expected_open] * 2
    # The auxiliary head: the analyzer's figure on the layer3 features.
    feats = dense_model.extract_feat(inputs)
    assert result['aux_head'] == analyzer_macs(dense_model.auxiliary_head,
                                               (feats, ))
    assert result['aux_head'] > 0
    # Gating: each BasicBlock gate pools its input and runs the two FCs.
    gating = 0
    for name, gate in gate_modules(model).items():
        cin, c = gate.in_channels, gate.out_channels
        block = model.get_submodule(name.rsplit('.', 1)[0])
        h, w = gate.output.input_size
        gating += cin * h * w + cin * HIDDEN + 2 * HIDDEN + HIDDEN * c
    assert result['gating'] == gating
    # Known patterns: the savings are those of the BasicBlock formula.
    patterns = make_patterns(model, 2, seed=4)
    patch_patterns(monkeypatch, model, patterns)
    result = count_macs(model, inputs)
    for i in range(2):
        saved = 0
        for name, mask in patterns.items():
            block = model.get_submodule(name.rsplit('.', 1)[0])
            cin, c = block.conv1.in_channels, block.conv1.out_channels
            # conv1 (3x3, padding = dilation) at its stride.
            s = block.conv1.stride[0]
            h, w = ((size - 1) // s + 1 for size in
                    getattr(block, 'gate').output.input_size)
            k = int(mask[i].sum())
            saved += (c - k) * (cin * 9 * h * w + 2 * h * w + c * 9 * h * w)
        assert result['per_sample'][i].item() == expected_open - saved
    # The records predict() attaches count as count_macs does.
    from mmseg.structures import SegDataSample
    metas = [dict(img_shape=(64, 64), ori_shape=(64, 64), pad_shape=(64, 64))
             for _ in range(2)]
    samples = model.predict(inputs, [SegDataSample(metainfo=m)
                                     for m in metas])
    counter = MacCounter(model)
    for i, sample in enumerate(samples):
        counted = counter(sample.metainfo)
        assert counted['dense_macs'] == reference
        assert counted['conditional_macs'] == result['per_sample'][i].item()
        assert set(sample.gate_open) == set(gate_modules(model))


# ----------------------------------------------------------------------------
# Gate overhead and errors
# ----------------------------------------------------------------------------
def test_block_gate_overhead_by_hand():
    init_default_scope('mmpretrain')
    from mmgated.models.backbones.mmpretrain_resnet import GatedResNet
    model = GatedResNet(depth=18)
    rows = block_gate_overhead(model, torch.zeros(1, 3, 64, 64))
    assert [r['block'] for r in rows][:2] == ['layer1.0', 'layer1.1']
    assert len(rows) == 8
    # layer4.1: 512 channels at 2x2 (64 / 32), no downsample.
    last = rows[-1]
    c, hw = 512, 2 * 2
    block = 2 * (c * c * 9 * hw + 2 * c * hw)
    gate = c * hw + c * HIDDEN + 2 * HIDDEN + HIDDEN * c
    assert last['block_macs'] == block
    assert last['gate_macs'] == gate
    assert last['gate_fc_macs'] == gate - c * hw
    assert last['overhead'] == pytest.approx(gate / block)
    # Dense figure against mmpretrain's dense ResNet-18.
    from mmpretrain.models import ResNet
    inputs = torch.zeros(1, 3, 64, 64)
    assert count_macs(model, inputs)['dense'] == analyzer_total(
        ResNet(depth=18), inputs)


def test_paper_overhead_range():
    # Paper, section 4.1: 0.018 % - 0.087 % of a ResNet block's MACs; the
    # non-downsampling blocks of ResNet-18 at 224 x 224 span exactly that.
    from mmgated.models.backbones.mmpretrain_resnet import GatedResNet
    rows = block_gate_overhead(GatedResNet(depth=18),
                               torch.zeros(1, 3, 224, 224))
    plain = [r['overhead'] for r in rows if not r['block'].endswith('.0')
             or r['block'] == 'layer1.0']
    assert round(100 * min(plain), 3) == 0.018
    assert round(100 * max(plain), 3) == 0.087


def test_errors(resnet20):
    with pytest.raises(ValueError, match='has no ChannelGate'):
        count_macs(ResNetCifar(depth=20), torch.zeros(1, 3, 32, 32))
    with pytest.raises(ValueError, match=r'\(N, C, H, W\).*\(3, 32, 32\)'):
        count_macs(resnet20, torch.zeros(3, 32, 32))
    with pytest.raises(ValueError, match='at least one sample'):
        dense_macs(resnet20, torch.zeros(0, 3, 32, 32))
    with pytest.raises(ValueError, match='no gated block'):
        gated_savings(ResNetCifar(depth=20))
    fresh = GatedResNetCifar(depth=20)
    with pytest.raises(KeyError, match='no gate record of'):
        gated_savings(fresh)
