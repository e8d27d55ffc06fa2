"""Tests for weights-only loading of MMEngine checkpoints after importing
mmdgms: real message-hub state loads, and crafted pickles are still rejected.
"""
import os
import pickle

import numpy as np
import pytest
import torch
from mmengine.logging import HistoryBuffer, MessageHub
from mmengine.runner import CheckpointLoader

import mmdgms  # noqa: F401  (registers the allow-list on import)
from mmdgms.checkpoint import history_buffer_method


class Call:
    """Object that pickles as ``func(*args)``, with Call objects nestable
    inside ``args``.
    """

    def __init__(self, func, args):
        self.func = func
        self.args = args

    def __reduce__(self):
        return self.func, self.args


def save(obj, path):
    torch.save(obj, path)
    return path


@pytest.fixture
def message_hub_state():
    hub = MessageHub.get_instance('checkpoint-safety-test')
    for step, loss in enumerate([1.5, 1.0, 0.5]):
        hub.update_scalar('train/loss', loss)
        hub.update_scalar('train/lr', np.float64(0.01 / (step + 1)))
    hub.update_info('epoch', np.int64(3))
    hub.update_info('iter', 42)
    return hub.state_dict()


def test_message_hub_checkpoint_loads(tmp_path, message_hub_state):
    checkpoint = {
        'meta': {
            'epoch': 3,
            'seed': np.int64(7)
        },
        'state_dict': {
            'conv.weight': torch.randn(4, 3, 3, 3)
        },
        'message_hub': message_hub_state,
        'best_score': np.float64(0.375),
        'anchors': np.arange(12, dtype=np.float32).reshape(3, 4),
        'labels': np.array([1, 0, 2], dtype=np.int64),
    }
    path = save(checkpoint, tmp_path / 'epoch_3.pth')

    loaded = torch.load(path, map_location='cpu', weights_only=True)

    scalars = loaded['message_hub']['log_scalars']
    assert isinstance(scalars['train/loss'], HistoryBuffer)
    assert scalars['train/loss'].mean() == pytest.approx(1.0)
    assert scalars['train/loss'].current() == pytest.approx(0.5)
    assert scalars['train/loss'].min() == pytest.approx(0.5)
    assert scalars['train/lr'].max() == pytest.approx(0.01)
    assert loaded['message_hub']['runtime_info']['epoch'] == 3
    assert loaded['message_hub']['runtime_info']['iter'] == 42
    assert isinstance(loaded['best_score'], np.float64)
    assert loaded['best_score'] == 0.375
    assert loaded['meta']['seed'] == 7
    np.testing.assert_array_equal(loaded['anchors'],
                                  checkpoint['anchors'])
    assert loaded['anchors'].dtype == np.float32
    np.testing.assert_array_equal(loaded['labels'], [1, 0, 2])
    torch.testing.assert_close(loaded['state_dict']['conv.weight'],
                               checkpoint['state_dict']['conv.weight'])


def test_message_hub_checkpoint_loads_through_mmengine(
        tmp_path, message_hub_state):
    # MMEngine 0.10.7 calls torch.load without weights_only, so it gets
    # torch's default, which is weights-only loading since torch 2.6.
    path = save({'message_hub': message_hub_state}, tmp_path / 'latest.pth')

    loaded = CheckpointLoader.load_checkpoint(str(path), map_location='cpu')

    loss = loaded['message_hub']['log_scalars']['train/loss']
    assert loss.mean() == pytest.approx(1.0)


def test_getattr_itself_not_allowed():
    allowed = torch.serialization.get_safe_globals()

    assert getattr not in allowed
    assert (history_buffer_method, 'builtins.getattr') in allowed


@pytest.mark.parametrize('name', ['min', 'max', 'mean', 'current'])
def test_history_buffer_method_allows_statistics(name):
    assert history_buffer_method(HistoryBuffer, name) is getattr(
        HistoryBuffer, name)


@pytest.mark.parametrize('owner, name', [
    (HistoryBuffer, '__init__'),
    (HistoryBuffer, '__class__'),
    (HistoryBuffer, '__reduce_ex__'),
    (HistoryBuffer, 'update'),
    (np, 'load'),
    (os, 'system'),
    (np.dtype, '__init__'),
],
                         ids=[
                             'HistoryBuffer.__init__',
                             'HistoryBuffer.__class__',
                             'HistoryBuffer.__reduce_ex__',
                             'HistoryBuffer.update', 'numpy.load',
                             'os.system', 'numpy.dtype.__init__'
                         ])
def test_history_buffer_method_rejects_other_lookups(owner, name):
    with pytest.raises(pickle.UnpicklingError, match=name):
        history_buffer_method(owner, name)


# numpy >= 2 keeps the array internals in numpy._core, numpy 1 in numpy.core.
_RECONSTRUCT = getattr(np, '_core', np.core).multiarray._reconstruct


@pytest.mark.parametrize('payload', [
    Call(getattr, (HistoryBuffer, '__init__')),
    Call(getattr, (HistoryBuffer, '__class__')),
    Call(getattr, (np.dtype, '__init__')),
    Call(getattr, (Call(getattr, (_RECONSTRUCT, '__self__')), 'load')),
],
                         ids=[
                             'getattr-HistoryBuffer-__init__',
                             'getattr-HistoryBuffer-__class__',
                             'getattr-numpy.dtype-__init__',
                             'getattr-numpy-module-load'
                         ])
def test_crafted_getattr_rejected(tmp_path, payload):
    path = save({'message_hub': payload}, tmp_path / 'crafted.pth')

    with pytest.raises(pickle.UnpicklingError,
                       match='only the HistoryBuffer statistics methods'):
        torch.load(path, weights_only=True)


def test_os_system_rejected(tmp_path):
    marker = tmp_path / 'marker'
    path = save({'meta': Call(os.system, (f'touch {marker}', ))},
                tmp_path / 'crafted.pth')

    with pytest.raises(pickle.UnpicklingError, match='system'):
        torch.load(path, weights_only=True)
    # The default of torch.load is weights-only loading, too.
    with pytest.raises(pickle.UnpicklingError, match='system'):
        torch.load(path)
    assert not marker.exists()


def test_numpy_load_rejected(tmp_path):
    source = tmp_path / 'source.npy'
    np.save(source, np.arange(3))
    path = save({'meta': Call(np.load, (str(source), ))},
                tmp_path / 'crafted.pth')

    with pytest.raises(pickle.UnpicklingError, match='numpy.load'):
        torch.load(path, weights_only=True)
