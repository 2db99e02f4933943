"""Installation-level behaviour: shims, registration, entry points."""
import os
import shutil
import subprocess
import sys
import textwrap

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_python(code, timeout=300):
    return subprocess.run([sys.executable, '-c', textwrap.dedent(code)],
                          cwd=REPO,
                          capture_output=True,
                          text=True,
                          timeout=timeout)


SAVE_MMENGINE_CHECKPOINT = """
    import torch
    from mmengine.logging import MessageHub
    hub = MessageHub.get_instance('ckpt')
    hub.update_scalar('train/loss', 0.5)
    hub.update_info('iter', 3)
    torch.save(dict(meta=dict(epoch=1), message_hub=hub.state_dict(),
                    state_dict={{'w': torch.ones(2)}}), {path!r})
"""


def test_resume_shim_reproduces_and_prevents_the_failure(tmp_path):
    path = str(tmp_path / 'ckpt.pth')
    saved = run_python(SAVE_MMENGINE_CHECKPOINT.format(path=path))
    assert saved.returncode == 0, saved.stderr
    load = f"""
        from mmengine.runner.checkpoint import _load_checkpoint
        ckpt = _load_checkpoint({path!r}, map_location='cpu')
        hub = ckpt['message_hub']['log_scalars']['train/loss']
        print('loaded', hub.current())
    """
    # What mmengine does on torch >= 2.6 without the shim: resume fails.
    without = run_python(load)
    assert without.returncode != 0
    assert 'Weights only load failed' in without.stderr
    # With the shim, mmengine's loader resumes; the shim is narrow: plain
    # torch.load still refuses these types (one process for both).
    with_shim = run_python('import mmgated, torch\n' + textwrap.dedent(load) +
                           textwrap.dedent(f"""
        try:
            torch.load({path!r})
        except Exception as error:
            print('plain load refused:', 'Weights only load failed' in str(error))
    """))
    assert with_shim.returncode == 0, with_shim.stderr
    assert 'loaded 0.5' in with_shim.stdout
    assert 'plain load refused: True' in with_shim.stdout, with_shim.stdout


def test_registered_in_both_scopes_and_reached_through_custom_imports(
        tmp_path):
    config = tmp_path / 'cfg.py'
    config.write_text(
        "custom_imports = dict(imports=['mmgated'], "
        'allow_failed_imports=False)\n'
        "model = dict(type='GatedResNetCifar', depth=20)\n")
    result = run_python(f"""
        from mmengine.config import Config
        from mmengine.registry import init_default_scope
        from mmengine.utils import import_modules_from_strings
        cfg = Config.fromfile({str(config)!r})
        import_modules_from_strings(**cfg.custom_imports)
        from mmpretrain.registry import MODELS as CLS
        from mmseg.registry import MODELS as SEG
        from mmseg.registry import METRICS as SEG_METRICS
        from mmpretrain.registry import METRICS as CLS_METRICS
        from mmengine.registry import HOOKS
        for name in ('GatedResNet', 'GatedResNetV1c', 'GatedEncoderDecoder',
                     'BatchShapingLoss', 'GateL0Loss'):
            assert name in SEG.module_dict, name
        for name in ('GatedResNet', 'GatedResNetV1c', 'GatedResNetCifar',
                     'GatedImageClassifier', 'BatchShapingLoss',
                     'GateL0Loss'):
            assert name in CLS.module_dict, name
        assert 'GateMetric' in SEG_METRICS.module_dict
        assert 'GateMetric' in CLS_METRICS.module_dict
        for name in ('BatchShapingWeightHook', 'L0WeightHook'):
            assert name in HOOKS.module_dict, name
        init_default_scope('mmpretrain')
        print(type(CLS.build(cfg.model)).__name__)
    """)
    assert result.returncode == 0, result.stderr
    assert 'GatedResNetCifar' in result.stdout


@pytest.mark.parametrize('missing,present', [('mmseg', 'mmpretrain'),
                                             ('mmpretrain', 'mmseg')])
def test_import_with_only_one_downstream_package(missing, present):
    result = run_python(f"""
        import sys
        sys.modules[{missing!r}] = None  # as if it were not installed
        import mmgated
        from mmgated.models import GatedResNet, GatedResNetV1c
        from {present}.registry import MODELS
        assert MODELS.get('GatedResNet') is GatedResNet
        print(GatedResNet.__module__)
        GatedResNet(depth=18)
    """)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == (
        f'mmgated.models.backbones.{present}_resnet')


def test_readme_commands_are_what_ci_runs():
    sys.path.insert(0, os.path.join(REPO, 'tools'))
    from readme_commands import readme_commands
    commands = readme_commands(os.path.join(REPO, 'README.md'))
    assert len(commands) == 2
    setup, tests = commands
    assert setup.startswith('bash tools/setup_env.sh')
    assert 'pytest' in tests
    with open(os.path.join(REPO, '.ci', 'run')) as f:
        ci = f.read()
    assert 'readme_commands.py README.md' in ci


def _setup_function(name):
    """The text of the shell function ``name`` in tools/setup_env.sh."""
    with open(os.path.join(REPO, 'tools', 'setup_env.sh')) as f:
        text = f.read()
    start = text.index(f'\n{name}() {{') + 1
    return text[start:text.index('\n}\n', start) + 3]


@pytest.mark.parametrize('log_text, expected', [
    (None, '0/?'),  # the build has not written its log yet
    ('running build_ext\n', '0/?'),  # no ninja step yet
    ('  [1/77] c++ a.cpp\n  [12/77] c++ b.cpp\nwarning\n', '12/77'),
])
def test_mmcv_build_progress_never_ends_the_setup(tmp_path, log_text,
                                                   expected):
    # The set-up script runs under `set -euo pipefail`; reading the progress
    # of the background mmcv build once ended it before ninja's first step.
    log = tmp_path / 'build.log'
    if log_text is not None:
        log.write_text(log_text)
    # Called as a plain command, where `set -e` applies inside the function
    # (a command substitution around the call would hide the failure).
    script = ('set -euo pipefail\n' + _setup_function('ninja_progress') +
              f'ninja_progress {log}\necho still running\n')
    result = subprocess.run(['bash', '-c', script], capture_output=True,
                            text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split('\n')[:2] == [expected, 'still running']


def test_setup_refuses_to_start_without_the_disk_space(tmp_path):
    """A disk that cannot hold the environment is named before pip starts
    (a CI run once failed midway with "No space left on device")."""
    check = _setup_function('check_free_space')
    free_kb = shutil.disk_usage(tmp_path).free // 1024
    for needed_kb, ok in ((free_kb // 2, True), (free_kb * 2, False)):
        script = ('set -euo pipefail\nVENV=/some/venv\n' + check +
                  f'check_free_space {tmp_path} {needed_kb}\necho fits\n')
        result = subprocess.run(['bash', '-c', script], capture_output=True,
                                text=True)
        assert (result.returncode == 0) == ok, result.stderr
        if not ok:
            assert 'GB free for /some/venv' in result.stderr
            assert str(tmp_path) in result.stderr
            assert 'MMGATED_VENV' in result.stderr
            assert 'fits' not in result.stdout


def test_collect_env_reports_versions_ops_and_registries():
    result = subprocess.run(
        [sys.executable, '-m', 'mmgated.utils.collect_env'],
        cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    for key in ('torch:', 'mmcv:', 'mmengine:', 'mmseg:', 'mmpretrain:',
                'mmgated:', 'CUDA available:', 'mmcv ops: available',
                'mmgated skip-execution kernel: ',
                'mmseg MODELS (mmgated): GatedResNet',
                'mmpretrain MODELS (mmgated): GatedResNet'):
        assert key in out, key


def test_version():
    import mmgated
    assert mmgated.__version__.count('.') == 2
