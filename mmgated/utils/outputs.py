"""Refuse to overwrite what a user made, unless told to.

The tools check their outputs before they write anything, so that a
repeated command or a mistyped path costs an error message, not a trained
model or an evaluation.
"""
import glob
import os
import os.path as osp
from typing import List, Optional


class OutputExistsError(FileExistsError):
    """A tool would overwrite existing files."""


def check_output_free(path: Optional[str], force: bool = False,
                      option: str = '--out') -> None:
    """Refuse an output path that is an existing file or a non-empty
    directory.

    Args:
        path (str, optional): The output file or directory; None (no
            output) passes.
        force (bool): The user passed ``--force``: overwriting is allowed.
        option (str): The command-line option that named ``path``, for the
            error message.

    Raises:
        OutputExistsError: Naming the path and the ways out.
    """
    if force or path is None:
        return
    if osp.isfile(path):
        what = 'an existing file'
    elif osp.isdir(path) and os.listdir(path):
        what = 'a directory that is not empty'
    else:
        return
    raise OutputExistsError(
        f'{option} {path!r} is {what}, which this command would overwrite. '
        f'Choose another {option}, or pass --force to overwrite it.')


def existing_checkpoints(work_dir: str) -> List[str]:
    """The names of the checkpoints (``*.pth``) and of mmengine's
    ``last_checkpoint`` file directly in ``work_dir``, sorted."""
    paths = glob.glob(osp.join(glob.escape(work_dir), '*.pth'))
    pointer = osp.join(work_dir, 'last_checkpoint')
    if osp.isfile(pointer):
        paths.append(pointer)
    return sorted(osp.basename(p) for p in paths)


def check_work_dir_free(work_dir: str) -> None:
    """Refuse to start a new training run in a work dir with checkpoints.

    mmengine would save over ``epoch_N.pth`` / ``iter_N.pth`` of the earlier
    run and point ``last_checkpoint`` at the new ones.

    Args:
        work_dir (str): The run's work dir (it need not exist).

    Raises:
        OutputExistsError: Naming the work dir, its checkpoints and the two
            ways out (``--resume``, ``--force``).
    """
    names = existing_checkpoints(work_dir)
    if not names:
        return
    shown = ', '.join(names[:5]) + (', ...' if len(names) > 5 else '')
    raise OutputExistsError(
        f'work dir {work_dir!r} already holds checkpoints ({shown}), which '
        'a new run would overwrite. Pass --resume to continue that run from '
        'its last checkpoint, or --force to start a new run there anyway '
        '(or choose another --work-dir).')
