"""Every config under configs/ builds, and the paper's recipes keep their
values.

* Each config (recursively) loads, builds its model with the MODELS
  registry of its default scope (construction only: no forward, no weight
  loading) and its optimizer wrapper, whose parameter groups must give the
  gating modules their intended weight decay; its train/val/test datasets
  build against the tiny datasets of tests/data_utils.py (CIFAR-10 lazily:
  its files are checksummed) and produce a sample through their pipelines.
* The values the paper states (sections 4.1, 5.1, 5.2) are checked per
  recipe family, so an edit of a base config cannot silently change them.
"""
import copy
import glob
import importlib
import os.path as osp

import pytest
from mmengine.config import Config, ConfigDict
from mmengine.model import BaseModel
from mmengine.optim import build_optim_wrapper
from mmengine.registry import init_default_scope

import mmgated  # noqa: F401  registers the gated models and hooks
from mmgated.models.gates import gate_modules

REPO = osp.dirname(osp.dirname(osp.abspath(__file__)))
CONFIG_DIR = osp.join(REPO, 'configs')
CONFIGS = sorted(
    osp.relpath(p, CONFIG_DIR)
    for p in glob.glob(osp.join(CONFIG_DIR, '**', '*.py'), recursive=True))

PSPNET = [
    'pspnet_r50_cityscapes_150k.py', 'pspnet_gated_r50_cityscapes.py',
    'pspnet_gated_r50_cityscapes_bs0.05.py',
    'pspnet_gated_r50_cityscapes_in1k-pre.py'
]
IN1K = [
    'resnet34_in1k_150e.py', 'resnet18_bas_in1k.py', 'resnet34_bas_in1k.py',
    'resnet50_bas_in1k.py'
]
CIFAR = [
    'resnet20_cifar10.py', 'resnet32_cifar10.py', 'resnet20_bas_cifar10.py',
    'resnet32_bas_cifar10.py', 'resnet20_l0_cifar10.py',
    'resnet32_l0_cifar10.py'
]
BETA_PRIOR = dict(type='beta', a=0.6, b=0.4)
TAU = 2 / 3


def load(name):
    return Config.fromfile(osp.join(CONFIG_DIR, name))


def build_model(cfg):
    """Build ``cfg.model`` as the Runner does, in the config's scope."""
    init_default_scope(cfg.default_scope)
    registry = importlib.import_module(f'{cfg.default_scope}.registry')
    model_cfg = copy.deepcopy(cfg.model)
    if cfg.get('data_preprocessor') is not None:
        model_cfg.setdefault('data_preprocessor',
                             copy.deepcopy(cfg.data_preprocessor))
    return registry.MODELS.build(model_cfg)


def custom_hook(cfg, hook_type):
    hooks = [h for h in cfg.get('custom_hooks', []) if h.type == hook_type]
    assert len(hooks) <= 1, hooks
    return hooks[0] if hooks else None


def pipeline_step(pipeline, step_type):
    steps = [s for s in pipeline if s['type'] == step_type]
    assert len(steps) == 1, (step_type, pipeline)
    return steps[0]


# ------------------------------------------------------------ every config


def test_all_configs_are_listed():
    """The recipe lists below cover every top-level config."""
    top_level = {c for c in CONFIGS if osp.dirname(c) == ''}
    assert top_level == set(PSPNET + IN1K + CIFAR), (
        'add a new recipe to PSPNET, IN1K or CIFAR so that its paper values '
        'are checked', top_level ^ set(PSPNET + IN1K + CIFAR))
    assert 'examples/pspnet_gated_r50_custom_dataset.py' in CONFIGS
    assert 'examples/resnet34_bas_custom_folder.py' in CONFIGS


@pytest.mark.parametrize('name', CONFIGS)
def test_config_builds_model_and_optimizer(name):
    cfg = load(name)
    assert cfg.default_scope in ('mmseg', 'mmpretrain')
    model = build_model(cfg)
    assert isinstance(model, BaseModel)

    gated = cfg.model.type.startswith('Gated')
    gates = gate_modules(model)
    assert bool(gates) == gated
    if gated:
        assert cfg.custom_imports.imports == ['mmgated']
        assert all(g.tau == pytest.approx(TAU) for g in gates.values())

    wrapper = build_optim_wrapper(model, copy.deepcopy(cfg.optim_wrapper))
    decay = {}
    for group in wrapper.optimizer.param_groups:
        for param in group['params']:
            decay[id(param)] = group['weight_decay']
    base = cfg.optim_wrapper.optimizer.weight_decay
    # Paper: gating modules decay with 1e-6 on Cityscapes (section 5.2)
    # and not at all on CIFAR-10 and ImageNet (5.1, "similar settings").
    gate_decay = 1e-6 if cfg.default_scope == 'mmseg' else 0.0
    gate_params = 0
    for param_name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if '.gate' in param_name:
            gate_params += 1
            assert decay[id(param)] == pytest.approx(gate_decay, abs=1e-12), \
                param_name
        else:
            assert decay[id(param)] == pytest.approx(base), param_name
    assert bool(gate_params) == gated
    # The gated recipes step in two groups, the gating modules' and the
    # rest (MergedGroupsOptimWrapperConstructor), not one per parameter.
    assert len(wrapper.optimizer.param_groups) == (2 if gated else 1)


def point_to_tiny(dataset, roots):
    """A copy of a dataset config reading the tiny dataset of its type."""
    dataset = copy.deepcopy(dataset)
    kind = dataset['type']
    if kind in ('CIFAR10', 'CIFAR100'):
        # The real files are checksummed; build without loading them.
        dataset.update(lazy_init=True, download=False)
        return dataset, False
    tiny = {
        'CityscapesDataset': roots['cityscapes'],
        'BaseSegDataset': roots['seg_folder'],
        'ImageNet': roots['imagenet'],
        'CustomDataset': roots['imagenet'],
    }
    assert kind in tiny, f'no tiny stand-in for dataset type {kind}'
    dataset['data_root'] = tiny[kind]
    return dataset, True


@pytest.mark.parametrize('name', CONFIGS)
def test_config_builds_datasets(name, tiny_cityscapes, tiny_imagenet,
                                tiny_seg_folder):
    roots = dict(
        cityscapes=tiny_cityscapes,
        imagenet=tiny_imagenet,
        seg_folder=tiny_seg_folder)
    cfg = load(name)
    init_default_scope(cfg.default_scope)
    registry = importlib.import_module(f'{cfg.default_scope}.registry')
    for split in ('train', 'val', 'test'):
        loader = cfg.get(f'{split}_dataloader')
        assert loader is not None, split
        assert cfg.get(f'{split}_cfg') is not None, split
        if split != 'train':
            assert cfg.get(f'{split}_evaluator'), split
        dataset_cfg, full = point_to_tiny(loader.dataset, roots)
        dataset = registry.DATASETS.build(dataset_cfg)
        if full:
            assert len(dataset) > 0
            sample = dataset[0]
            assert {'inputs', 'data_samples'} <= set(sample)


# -------------------------------------------------- the paper's recipes


@pytest.mark.parametrize('name', PSPNET)
def test_pspnet_cityscapes_recipe(name):
    """Paper 5.2: crop 448x672, random mirror and resize 0.5-2, batch 6,
    150k iterations, SGD momentum 0.9, weight decay 1e-4, lr 2e-2 with
    poly(0.9), whole-image single-scale inference, from scratch."""
    cfg = load(name)
    assert cfg.default_scope == 'mmseg'
    pipeline = cfg.train_dataloader.dataset.pipeline
    assert pipeline_step(pipeline, 'RandomCrop')['crop_size'] == (448, 672)
    assert tuple(cfg.model.data_preprocessor.size) == (448, 672)
    assert tuple(pipeline_step(pipeline,
                               'RandomResize')['ratio_range']) == (0.5, 2.0)
    assert pipeline_step(pipeline, 'RandomFlip')['prob'] == 0.5
    assert not [s for s in pipeline if 'PhotoMetric' in s['type']]
    # 3 images x 2 processes (tools/dist_train.sh CFG 2).
    assert cfg.train_dataloader.batch_size * 2 == 6
    assert cfg.train_cfg.type == 'IterBasedTrainLoop'
    assert cfg.train_cfg.max_iters == 150000

    optimizer = cfg.optim_wrapper.optimizer
    assert optimizer.type == 'SGD'
    assert optimizer.lr == 0.02
    assert optimizer.momentum == 0.9
    assert optimizer.weight_decay == 1e-4
    schedulers = cfg.param_scheduler
    assert len(schedulers) == 1
    poly = schedulers[0]
    assert poly.type == 'PolyLR'
    assert (poly.power, poly.eta_min, poly.begin, poly.end,
            poly.by_epoch) == (0.9, 0.0, 0, 150000, False)
    assert cfg.model.test_cfg.mode == 'whole'
    assert cfg.model.decode_head.num_classes == 19
    assert cfg.model.backbone.depth == 50
    assert cfg.train_dataloader.dataset.type == 'CityscapesDataset'

    # The 0.05 point (IoU 0.747 at 95 % MACs) is an ImageNet-pretrained one.
    if name.endswith(('in1k-pre.py', 'bs0.05.py')):
        assert cfg.model.pretrained == 'open-mmlab://resnet50_v1c'
    else:
        assert cfg.model.pretrained is None  # "trained from scratch"
    if 'gated' not in name:
        assert cfg.model.type == 'EncoderDecoder'
        return
    assert cfg.model.type == 'GatedEncoderDecoder'
    assert cfg.model.backbone.type == 'GatedResNetV1c'
    assert cfg.model.backbone.gate_cfg.tau == pytest.approx(TAU)
    bs = cfg.model.batch_shaping_loss
    assert bs.type == 'BatchShapingLoss'
    assert bs.prior == BETA_PRIOR
    # lambda = 0.2 (IoU 0.719 / 0.744), 0.05 for the 95 % MAC point.
    assert bs.loss_weight == (0.05 if 'bs0.05' in name else 0.2)
    # "We only used our batch-shaping loss with a fixed coefficient".
    assert cfg.model.l0_loss is None
    assert custom_hook(cfg, 'L0WeightHook') is None
    hook = custom_hook(cfg, 'BatchShapingWeightHook')
    assert hook.get('end') is None and hook.by_epoch is False
    assert hook.get('start_weight') is None  # the model's loss_weight
    # "Weight decay for the layers in the gating units was set to 1e-6".
    custom_keys = cfg.optim_wrapper.paramwise_cfg.custom_keys
    assert custom_keys == {'.gate': dict(decay_mult=0.01)}
    assert optimizer.weight_decay * custom_keys['.gate'][
        'decay_mult'] == pytest.approx(1e-6)


def check_classification_gates(cfg, bs_end, l0_start, l0_end, gated_type,
                               with_bs=True):
    assert cfg.model.type == 'GatedImageClassifier'
    assert cfg.model.backbone.type == gated_type
    assert cfg.model.backbone.gate_cfg.tau == pytest.approx(TAU)
    # gamma is a top-level value so that a sweep is --cfg-options l0_gamma=
    assert isinstance(cfg.l0_gamma, float) and cfg.l0_gamma > 0
    l0_hook = custom_hook(cfg, 'L0WeightHook')
    assert (l0_hook.start, l0_hook.end) == (l0_start, l0_end)
    assert l0_hook.get('gamma') is None  # reads l0_gamma
    assert l0_hook.get('by_epoch', True) is True
    assert cfg.model.l0_loss.type == 'GateL0Loss'
    bs_hook = custom_hook(cfg, 'BatchShapingWeightHook')
    if with_bs:
        bs = cfg.model.batch_shaping_loss
        # lambda_0 = 0.75, Beta(0.6, 0.4), annealed linearly to 0.
        assert (bs.type, bs.loss_weight, bs.prior) == ('BatchShapingLoss',
                                                       0.75, BETA_PRIOR)
        assert bs_hook.end == bs_end
        assert bs_hook.get('by_epoch', True) is True
        assert bs_hook.get('start_weight') is None
    else:
        assert cfg.model.batch_shaping_loss is None
        assert bs_hook is None
    # "No weight decay was applied on the parameters of the gating modules"
    assert cfg.optim_wrapper.paramwise_cfg.custom_keys == {
        '.gate': dict(decay_mult=0.0)
    }


def check_sgd_multistep(cfg, max_epochs, milestones, weight_decay):
    optimizer = cfg.optim_wrapper.optimizer
    assert (optimizer.type, optimizer.lr, optimizer.momentum,
            optimizer.nesterov) == ('SGD', 0.1, 0.9, True)
    assert optimizer.weight_decay == weight_decay
    scheduler = cfg.param_scheduler
    assert scheduler.type == 'MultiStepLR'
    assert list(scheduler.milestones) == milestones
    assert (scheduler.gamma, scheduler.by_epoch) == (0.1, True)
    assert cfg.train_cfg.by_epoch is True
    assert cfg.train_cfg.max_epochs == max_epochs
    assert cfg.train_dataloader.batch_size == 256


@pytest.mark.parametrize('name', PSPNET + IN1K + CIFAR)
def test_paper_batch_scales_the_learning_rate(name):
    """The paper's total batch (Cityscapes 6, ImageNet and CIFAR 256) on the
    GPU count each config assumes (2, 1, 1) is auto_scale_lr's base, so on
    another count mmengine scales the learning rate."""
    cfg = load(name)
    paper_batch, gpus = (6, 2) if 'cityscapes' in name else (256, 1)
    assert cfg.train_dataloader.batch_size * gpus == paper_batch
    assert cfg.auto_scale_lr == dict(enable=True, base_batch_size=paper_batch)


@pytest.mark.parametrize('name', IN1K)
def test_imagenet_recipe(name):
    """Paper 5.2: 150 epochs, batch 256, Nesterov 0.9, weight decay 1e-4,
    lr 0.1 / 10 at 60, 90, 120; BS 0.75 -> 0 by epoch 20, L0 30 -> 60."""
    cfg = load(name)
    assert cfg.default_scope == 'mmpretrain'
    check_sgd_multistep(cfg, 150, [60, 90, 120], 1e-4)
    assert cfg.train_dataloader.dataset.type == 'ImageNet'
    assert cfg.model.head.num_classes == 1000
    depth = int(name.split('_')[0][len('resnet'):])
    assert cfg.model.backbone.depth == depth
    if '_bas_' not in name:
        assert cfg.model.type == 'ImageClassifier'
        return
    check_classification_gates(cfg, 20, 30, 60, 'GatedResNet')


@pytest.mark.parametrize('name', CIFAR)
def test_cifar_recipe(name):
    """Paper 5.1: 500 epochs, batch 256, Nesterov 0.9, weight decay 5e-4,
    lr 0.1 / 10 at 300, 375, 450, random crop and flip; BS 0.75 -> 0 by
    epoch 100, L0 100 -> 300. Section 5.3: the L0-only ablation."""
    cfg = load(name)
    assert cfg.default_scope == 'mmpretrain'
    check_sgd_multistep(cfg, 500, [300, 375, 450], 5e-4)
    assert cfg.train_dataloader.dataset.type == 'CIFAR10'
    pipeline = cfg.train_dataloader.dataset.pipeline
    assert pipeline_step(pipeline, 'RandomCrop')['crop_size'] == 32
    assert pipeline_step(pipeline, 'RandomFlip')['direction'] == 'horizontal'
    assert cfg.model.head.num_classes == 10
    depth = int(name.split('_')[0][len('resnet'):])
    assert cfg.model.backbone.depth == depth
    if '_bas_' not in name and '_l0_' not in name:
        assert cfg.model.backbone.type == 'ResNetCifar'
        return
    check_classification_gates(
        cfg, 100, 100, 300, 'GatedResNetCifar', with_bs='_bas_' in name)


def test_l0_gamma_sweep_through_cfg_options():
    """--cfg-options l0_gamma=... changes the gamma L0WeightHook reads."""
    cfg = load('resnet20_bas_cifar10.py')
    cfg.merge_from_dict({'l0_gamma': 0.15})
    assert cfg.l0_gamma == 0.15
    assert custom_hook(cfg, 'L0WeightHook').get('gamma') is None


def test_examples_change_only_the_dataset():
    """configs/examples/ keep the recipe and swap the data (and the number
    of classes)."""
    seg = load('examples/pspnet_gated_r50_custom_dataset.py')
    base = load('pspnet_gated_r50_cityscapes.py')
    assert seg.train_dataloader.dataset.type == 'BaseSegDataset'
    num_classes = len(seg.train_dataloader.dataset.metainfo.classes)
    assert seg.model.decode_head.num_classes == num_classes
    assert seg.model.auxiliary_head.num_classes == num_classes
    for key in ('optim_wrapper', 'param_scheduler', 'train_cfg',
                'custom_hooks'):
        assert seg[key] == base[key], key
    for key in ('backbone', 'batch_shaping_loss', 'l0_loss',
                'data_preprocessor'):
        assert seg.model[key] == base.model[key], key
    assert seg.train_dataloader.dataset.pipeline == \
        base.train_dataloader.dataset.pipeline

    cls = load('examples/resnet34_bas_custom_folder.py')
    base = load('resnet34_bas_in1k.py')
    assert cls.train_dataloader.dataset.type == 'CustomDataset'
    assert 'split' not in cls.train_dataloader.dataset
    assert cls.model.head.num_classes == cls.data_preprocessor.num_classes
    for key in ('optim_wrapper', 'param_scheduler', 'train_cfg',
                'custom_hooks', 'l0_gamma'):
        assert cls[key] == base[key], key
    for key in ('backbone', 'batch_shaping_loss', 'l0_loss'):
        assert cls.model[key] == base.model[key], key
    assert [s.type for s in cls.train_dataloader.dataset.pipeline] == \
        [s.type for s in base.train_dataloader.dataset.pipeline]
    assert isinstance(cls.val_evaluator, (list, ConfigDict))
