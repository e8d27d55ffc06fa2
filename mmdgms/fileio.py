"""Atomic file output for tools that write through a file name."""
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Union


@contextmanager
def atomic_output(path: Union[str, Path]) -> Iterator[str]:
    """Yield a temporary file name beside ``path``; rename it onto ``path``.

    The rename happens only when the ``with`` block finishes without an
    exception, so ``path`` holds either its old content or the complete new
    file, never a partial one. On an exception the temporary file is
    removed. The temporary name keeps ``path``'s suffix, because some
    writers (matplotlib, OpenCV) choose the format by it.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temp_name = tempfile.mkstemp(prefix=f'.{path.stem}.tmp-',
                                     suffix=path.suffix, dir=path.parent)
    os.close(fd)
    try:
        yield temp_name
        # mkstemp creates the file readable by its owner only.
        os.chmod(temp_name, 0o644)
        os.replace(temp_name, path)
    except BaseException:
        Path(temp_name).unlink(missing_ok=True)
        raise
