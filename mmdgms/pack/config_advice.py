"""Config advice for pack errors: which existing config to pass instead.

Configs are searched in the folder of the config that was given and, in a
source checkout, in the repository's configs/ folder.
"""
import glob
import os
import os.path as osp
from pathlib import Path
from typing import List

# The configs/ folder of a source checkout. It does not exist when mmdgms is
# installed from a wheel, and the search then skips it.
REPO_CONFIGS = Path(__file__).resolve().parents[2] / 'configs'
FALLBACK_DGMS_FOLDER = REPO_CONFIGS / 'dgms'


def _display_path(path: str) -> str:
    """Return ``path`` relative to the working directory when it is below
    it, else absolute."""
    relative = osp.relpath(path)
    outside = (relative == os.pardir
               or relative.startswith(os.pardir + os.sep))
    return path if outside else relative


def _folder_label(config_path: str) -> str:
    return osp.dirname(config_path) or os.curdir


def find_config_files(stem: str, near_config: str) -> List[str]:
    """Return the existing files named ``stem + '.py'`` in the folder of
    ``near_config``, then under the repository's configs/ folder, each
    file once."""
    if not stem or osp.basename(stem) != stem:
        return []
    file_name = stem + '.py'
    candidates = [osp.join(osp.dirname(near_config), file_name)]
    if REPO_CONFIGS.is_dir():
        pattern = osp.join(glob.escape(str(REPO_CONFIGS)), '**',
                           glob.escape(file_name))
        candidates += [
            _display_path(path)
            for path in sorted(glob.glob(pattern, recursive=True))
        ]

    found, seen = [], set()
    for path in candidates:
        real = osp.realpath(path)
        if osp.isfile(path) and real not in seen:
            seen.add(real)
            found.append(path)
    return found


def trained_config_advice(checkpoint_path: str, config_path: str) -> str:
    """Return the sentences of a pack error that name the config to pass
    with the checkpoint.

    The config is the one named in MMEngine's
    ``checkpoint['meta']['experiment_name']``, found as a file by
    :func:`find_config_files`. When the checkpoint records no name, the
    sentences state that and ask for the config that training was given.
    """
    from ..apis.checkpoint_match import read_checkpoint_summary
    try:
        summary = read_checkpoint_summary(checkpoint_path)
    except (OSError, ValueError, RuntimeError):
        summary = None
    name = summary.config_name if summary is not None else None
    if not name:
        return ('Pass the config file that tools/train.py was given when it '
                'wrote the checkpoint: the checkpoint does not record its '
                "name in checkpoint['meta']['experiment_name'].")

    recorded = (f"checkpoint['meta']['experiment_name'] records config "
                f'{name!r}')
    saved_text = ''
    if summary.has_config_text:
        saved_text = (" Its full text at training time is stored in "
                      "checkpoint['meta']['cfg'].")
    given_real_path = osp.realpath(config_path)
    paths = find_config_files(name, config_path)
    others = [path for path in paths if osp.realpath(path) != given_real_path]
    if others:
        return (f'Pass the config the checkpoint was trained with: '
                f'{" or ".join(others)} ({recorded}).{saved_text}')
    if paths:
        return (f'{recorded}, the file name of {config_path}, but the two do '
                'not match: the config has changed since training, or '
                'another file of that name trained the checkpoint. Pass the '
                f'config as it was at training time.{saved_text}')
    where = _folder_label(config_path)
    if REPO_CONFIGS.is_dir():
        where += f' or {_display_path(str(REPO_CONFIGS))}'
    advice = (f'Pass the config the checkpoint was trained with: '
              f'{recorded}, but no {name}.py is in {where}.')
    if summary.has_config_text:
        advice += (" Save the text of checkpoint['meta']['cfg'] as "
                   f'{name}.py and pass that file.')
    return advice


def dgms_config_suggestion(config_path: str) -> str:
    """Return a phrase that names the DGMS configs to use in place of the
    full-precision config ``config_path``.

    The configs are the other .py files in its folder whose name contains
    'dgms', or the repository's configs/dgms/ folder when there are none.
    """
    folder = _folder_label(config_path)
    own_name = osp.basename(config_path)
    names = sorted(
        name for name in os.listdir(folder)
        if name.endswith('.py') and 'dgms' in name.lower()
        and name != own_name and osp.isfile(osp.join(folder, name)))
    if names:
        paths = [osp.join(osp.dirname(config_path), name) for name in names]
        return f'such as {" or ".join(paths)}'
    if FALLBACK_DGMS_FOLDER.is_dir():
        folder_path = _display_path(str(FALLBACK_DGMS_FOLDER))
        return f'e.g. one in {folder_path}{os.sep}'
    return "e.g. one in the mmdgms repository's configs/dgms/"
