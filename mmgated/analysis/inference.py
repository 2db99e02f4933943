"""Build a model and an evaluation dataloader from a config, and run it.

What the analysis tools share: they load a config the way tools/test.py
does, build the model in the config's scope (mmseg or mmpretrain), load a
checkpoint and run the validation (or test) dataloader through
``predict``, without a Runner (no work dir, hooks or logging).
"""
import copy
from typing import Iterator, Optional, Tuple

import torch
import torch.nn as nn
from mmengine.config import Config
from mmengine.model import revert_sync_batchnorm
from mmengine.registry import MODELS, init_default_scope
from mmengine.runner import Runner, load_checkpoint

SPLITS = ('val', 'test')


def task_of(model: nn.Module) -> str:
    """``'segmentation'`` for mmseg segmentors (they have a
    ``decode_head``), ``'classification'`` otherwise."""
    return 'segmentation' if hasattr(model, 'decode_head') else \
        'classification'


def default_device() -> str:
    """``'cuda'`` when a GPU is available, else ``'cpu'``."""
    return 'cuda' if torch.cuda.is_available() else 'cpu'


def build_model(cfg: Config,
                checkpoint: Optional[str] = None,
                device: str = 'cpu') -> nn.Module:
    """Build ``cfg.model`` in the config's scope, in eval mode.

    SyncBN layers are turned into BN, so that a model trained on several
    GPUs runs in one (CPU) process.

    Args:
        cfg (Config): A full config (with ``default_scope``).
        checkpoint (str, optional): Checkpoint to load (its ``state_dict``
            or ``model`` entry); strict except for missing keys reported by
            mmengine.
        device (str): Device to move the model to.

    Returns:
        nn.Module
    """
    init_default_scope(cfg.get('default_scope', 'mmseg'))
    model_cfg = copy.deepcopy(cfg.model)
    # As the Runner does: a top-level data_preprocessor is the model's
    # unless the model config names its own.
    if cfg.get('data_preprocessor') is not None:
        model_cfg.setdefault('data_preprocessor',
                             copy.deepcopy(cfg.data_preprocessor))
    model = MODELS.build(model_cfg)
    model = revert_sync_batchnorm(model)
    if checkpoint is not None:
        load_checkpoint(model, checkpoint, map_location='cpu')
    model.to(device)
    model.eval()
    return model


def build_eval_dataloader(cfg: Config,
                          split: str = 'val',
                          batch_size: Optional[int] = None,
                          num_workers: Optional[int] = None):
    """The ``<split>_dataloader`` of a config, in order (no shuffling).

    Args:
        cfg (Config): A full config.
        split (str): ``'val'`` or ``'test'``.
        batch_size (int, optional): Override the config's batch size.
        num_workers (int, optional): Override the config's workers.

    Returns:
        DataLoader
    """
    if split not in SPLITS:
        raise ValueError(f'split {split!r} is not one of {SPLITS}')
    key = f'{split}_dataloader'
    loader_cfg = cfg.get(key)
    if not loader_cfg:
        raise ValueError(f'the config has no {key}')
    loader_cfg = copy.deepcopy(loader_cfg)
    if batch_size is not None:
        loader_cfg['batch_size'] = batch_size
    if num_workers is not None:
        loader_cfg['num_workers'] = num_workers
        if num_workers == 0:
            loader_cfg['persistent_workers'] = False
    init_default_scope(cfg.get('default_scope', 'mmseg'))
    return Runner.build_dataloader(loader_cfg, seed=0)


def class_names(dataloader, model: Optional[nn.Module] = None) -> list:
    """The class names of the dataset, or ``'0'``, ``'1'``, ... from the
    model's head when the dataset has none."""
    meta = getattr(dataloader.dataset, 'metainfo', None) or {}
    names = meta.get('classes')
    if names:
        return [str(n) for n in names]
    head = getattr(model, 'decode_head', None) or getattr(model, 'head', None)
    num = getattr(head, 'num_classes', None) or getattr(
        head, 'out_channels', None)
    if not num:
        raise ValueError('neither the dataset nor the model names the '
                         'number of classes')
    return [str(i) for i in range(num)]


@torch.no_grad()
def iterate_predictions(model: nn.Module,
                        dataloader,
                        max_samples: Optional[int] = None
                        ) -> Iterator[Tuple[torch.Tensor, list]]:
    """Run a dataloader through ``model.predict``, batch by batch.

    Args:
        model (nn.Module): A model with a ``data_preprocessor``.
        dataloader: An mmengine-style dataloader.
        max_samples (int, optional): Stop after this many samples (the
            last batch is cut). Default: all.

    Yields:
        tuple: ``(inputs, samples)``: the preprocessed input batch and the
        predicted data samples of that batch.
    """
    if max_samples is not None and max_samples < 1:
        raise ValueError(f'max_samples must be >= 1, got {max_samples!r}')
    seen = 0
    for batch in dataloader:
        data = model.data_preprocessor(batch, False)
        inputs, samples = data['inputs'], data['data_samples']
        if max_samples is not None and seen + len(samples) > max_samples:
            keep = max_samples - seen
            inputs, samples = inputs[:keep], samples[:keep]
        results = model(inputs, samples, mode='predict')
        seen += len(results)
        yield inputs, results
        if max_samples is not None and seen >= max_samples:
            break
