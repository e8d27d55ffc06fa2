"""Safe loading of MMEngine checkpoints under torch.load(weights_only=True).

Since torch 2.6, ``torch.load`` defaults to ``weights_only=True``: it
unpickles only tensors, containers and classes on an allow-list, so a
checkpoint cannot run arbitrary code. MMEngine 0.10.7 calls ``torch.load``
without ``weights_only``, and its checkpoints store the message hub state:
:class:`~mmengine.logging.HistoryBuffer` objects holding numpy arrays, and
numpy scalars among the runtime info. torch rejects those, so resuming and
``tools/test.py`` fail on any MMEngine checkpoint.

:func:`register_safe_globals` adds exactly those classes to torch's
allow-list. Safe loading stays on: a file that pickles any other object is
still rejected. numpy's array reconstruction helpers are data constructors
(they build arrays from a dtype, a shape and bytes) and run no user code.

A HistoryBuffer also pickles its statistics methods, as
``getattr(HistoryBuffer, 'mean')`` and so on. Allowing ``getattr`` itself
would let a crafted file reach any attribute of any allowed object (and from
there, code), so the name ``builtins.getattr`` is bound instead to
:func:`history_buffer_method`, which returns only those methods and rejects
every other lookup.
"""
import importlib
import pickle
from typing import List

import torch

# Statistics methods that HistoryBuffer defines and pickles by reference.
HISTORY_BUFFER_METHODS = frozenset({'min', 'max', 'mean', 'current'})

# (module, attribute) pairs that MMEngine checkpoints contain. Each is looked
# up at registration, so a name that a numpy version lacks is skipped.
_ALLOWED = [
    ('mmengine.logging.history_buffer', 'HistoryBuffer'),
    # numpy >= 2 moved the internals to numpy._core; numpy 1 has numpy.core.
    ('numpy._core.multiarray', '_reconstruct'),
    ('numpy.core.multiarray', '_reconstruct'),
    ('numpy._core.multiarray', 'scalar'),
    ('numpy.core.multiarray', 'scalar'),
    ('numpy', 'ndarray'),
    ('numpy', 'dtype'),
]
# numpy dtype classes (numpy >= 1.25 pickles dtypes through these).
_NUMPY_DTYPE_NAMES = [
    'Float16DType', 'Float32DType', 'Float64DType', 'Int8DType', 'Int16DType',
    'Int32DType', 'Int64DType', 'UInt8DType', 'UInt16DType', 'UInt32DType',
    'UInt64DType', 'BoolDType', 'StrDType', 'LongDType', 'ULongDType',
    'LongLongDType', 'ULongLongDType'
]


def _resolve(module_name: str, attr: str):
    try:
        module = importlib.import_module(module_name)
    except ImportError:
        return None
    return getattr(module, attr, None)


def safe_globals() -> List:
    """Return the objects that :func:`register_safe_globals` allows."""
    found = []
    for module_name, attr in _ALLOWED:
        obj = _resolve(module_name, attr)
        if obj is not None and obj not in found:
            found.append(obj)
    for name in _NUMPY_DTYPE_NAMES:
        obj = _resolve('numpy.dtypes', name)
        if obj is not None and obj not in found:
            found.append(obj)
    return found


def history_buffer_method(owner, name: str):
    """Return ``HistoryBuffer.<name>`` for a statistics method; reject the rest.

    Stands in for ``builtins.getattr`` while torch unpickles with
    ``weights_only=True``.

    Raises:
        pickle.UnpicklingError: for any other object or attribute name.
    """
    from mmengine.logging import HistoryBuffer
    if owner is HistoryBuffer and name in HISTORY_BUFFER_METHODS:
        return getattr(HistoryBuffer, name)
    raise pickle.UnpicklingError(
        f'the checkpoint asks for getattr({owner!r}, {name!r}); only the '
        f'HistoryBuffer statistics methods {sorted(HISTORY_BUFFER_METHODS)} '
        'are allowed under weights-only loading')


def register_safe_globals() -> None:
    """Allow MMEngine checkpoints under torch's weights-only unpickler.

    Does nothing on torch versions without ``add_safe_globals`` (< 2.4),
    which load without the weights-only restriction by default anyway.
    """
    add = getattr(torch.serialization, 'add_safe_globals', None)
    if add is not None:
        add(safe_globals() + [(history_buffer_method, 'builtins.getattr')])
