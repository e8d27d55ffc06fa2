"""Two CPU processes training DGMS through tools/dist_train.sh (gloo).

Each rank reads its own half of the 8 training tiles, so only a working
gradient all-reduce keeps the ranks' weights and mixtures equal. A test hook
(tests/helpers/rank_state_hook.py) makes every rank dump its state when
training ends.
"""
import os
import socket
import subprocess
import sys

import pytest
import torch
from mmengine.config import Config
from mmengine.registry import init_default_scope

from conftest import REPO_ROOT, TEST_CONFIGS, write_config

WORLD_SIZE = 2
LAYER_BITS = {'neck.*': 8, 'backbone.layer7.*': 2}


def expected_bits(layer: str) -> int:
    if layer.startswith('neck.'):
        return 8
    return 2 if layer.startswith('backbone.layer7.') else 4


def free_loopback_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(('127.0.0.1', 0))
        return sock.getsockname()[1]


def save_initial_weights(config, path):
    """Save the freshly initialised tiny detector as a load_from file."""
    from mmdet.registry import MODELS
    init_default_scope('mmdet')
    torch.manual_seed(0)
    model = MODELS.build(Config.fromfile(str(config)).model)
    torch.save(dict(state_dict=model.state_dict(), meta=dict()), path)
    return path


def mixture_state(state_dict):
    return {k: v for k, v in state_dict.items() if '.mixture.' in k}


@pytest.fixture(scope='module')
def dist_run(tree_data, tmp_path_factory):
    """Run 2 ranks for 2 epochs and return (work dir, load_from, output)."""
    folder = tmp_path_factory.mktemp('dist')
    config = write_config(
        folder / 'dgms.py', TEST_CONFIGS / 'tiny_retinanet_dgms_hook.py',
        tree_data,
        "custom_imports = dict(imports=['mmdgms', 'rank_state_hook'], "
        "allow_failed_imports=False)\n"
        # Mixed precision, so that the ranks also agree on codebooks of
        # different sizes. stats_interval lies beyond the 2 iterations: the
        # statistics are not under test here and take seconds per call.
        f"custom_hooks = [dict(type='DGMSHook', bits=4, "
        f"layer_bits={LAYER_BITS!r}, stats_interval=100), "
        "dict(type='RankStateDumpHook')]\n")
    load_from = save_initial_weights(TEST_CONFIGS / 'tiny_retinanet_fp.py',
                                     folder / 'initial.pth')
    work_dir = folder / 'work'

    env = dict(os.environ,
               PYTHON=sys.executable,
               PYTHONPATH=os.pathsep.join(
                   [str(REPO_ROOT), str(REPO_ROOT / 'tests' / 'helpers')]),
               MASTER_ADDR='127.0.0.1',
               PORT=str(free_loopback_port()),
               GLOO_SOCKET_IFNAME='lo',
               OMP_NUM_THREADS='1')
    proc = subprocess.run([
        'bash', str(REPO_ROOT / 'tools' / 'dist_train.sh'), str(config),
        str(WORLD_SIZE), '--work-dir', str(work_dir), '--cfg-options',
        f'load_from={load_from}', 'env_cfg.dist_cfg.backend=gloo'
    ], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-6000:]
    return work_dir, load_from, output


def rank_states(work_dir):
    return [
        torch.load(work_dir / f'rank{rank}.pth', weights_only=True)
        for rank in range(WORLD_SIZE)
    ]


def test_ranks_hold_identical_mixtures(dist_run):
    work_dir, load_from, _ = dist_run
    states = rank_states(work_dir)
    assert [s['wrapper'] for s in states] == ['MMDistributedDataParallel'] * 2

    reference = states[0]['state_dict']
    mixtures = mixture_state(reference)
    assert mixtures
    for rank, state in enumerate(states[1:], start=1):
        other = state['state_dict']
        assert other.keys() == reference.keys()
        differ = [k for k in reference if not torch.equal(reference[k],
                                                          other[k])]
        # BatchNorm running statistics are per rank (broadcast_buffers is
        # False and the ranks see different images); everything else must
        # be equal.
        differ = [k for k in differ if 'running_' not in k]
        assert differ == [], f'rank {rank} differs from rank 0: {differ[:5]}'


def test_mixtures_trained_on_every_rank(dist_run):
    work_dir, _, _ = dist_run
    state = rank_states(work_dir)[0]['state_dict']
    means = [k for k in state if k.endswith('.mixture.means')]
    assert means
    # The k-means start is recomputed from the initial weights: training
    # must have moved every layer's codebook away from it.
    from mmdgms.quant import GaussianMixtureQuantizer
    initial = torch.load(dist_run[1], weights_only=True)['state_dict']
    unchanged = []
    for key in means:
        layer = key[:-len('.mixture.means')]
        fresh = GaussianMixtureQuantizer(bits=expected_bits(layer))
        fresh.init_from_weights(initial[f'{layer}.weight'])
        if torch.equal(fresh.means.detach(), state[key]):
            unchanged.append(layer)
    assert unchanged == []


def test_checkpoint_written_once(dist_run):
    work_dir, _, output = dist_run
    states = rank_states(work_dir)
    # CheckpointHook saves every epoch, from rank 0 only.
    assert [s['saved_checkpoints'] for s in states] == [2, 0]
    assert sorted(p.name for p in work_dir.glob('*.pth')) == [
        'epoch_1.pth', 'epoch_2.pth', 'rank0.pth', 'rank1.pth'
    ]

    checkpoint = torch.load(work_dir / 'epoch_2.pth', weights_only=True)
    saved = mixture_state(checkpoint['state_dict'])
    live = mixture_state(states[0]['state_dict'])
    assert saved.keys() == live.keys()
    for key in live:
        assert torch.equal(saved[key], live[key]), key

    meta = checkpoint['meta']['dgms']
    wrong = {n: b for n, b in meta['layers'].items() if b != expected_bits(n)}
    assert wrong == {}
    assert set(meta['layers'].values()) == {2, 4, 8}
    weights = {
        n: checkpoint['state_dict'][f'{n}.weight'].numel()
        for n in meta['layers']
    }
    assert meta['params'] == sum(weights.values())
    average = sum(meta['layers'][n] * weights[n]
                  for n in weights) / meta['params']
    assert meta['avg_bits'] == pytest.approx(average)
    assert 'CPU distributed training: rank 0 of 2' in output


@pytest.mark.skipif(torch.cuda.is_available(),
                    reason='checks the set-up for machines without CUDA')
@pytest.mark.parametrize('launcher, options, message', [
    ('pytorch', {}, r"needs the gloo backend, but "
     r"env_cfg.dist_cfg.backend='nccl'. Add --cfg-options "
     r"env_cfg.dist_cfg.backend=gloo"),
    ('slurm', {'env_cfg.dist_cfg.backend': 'gloo'},
     '--launcher slurm without CUDA is not supported'),
])
def test_cpu_launch_rejects_bad_setup(launcher, options, message):
    import train
    cfg = Config.fromfile(str(TEST_CONFIGS / 'tiny_retinanet_dgms.py'))
    cfg.merge_from_dict(options)
    with pytest.raises(SystemExit, match=message):
        train.setup_cpu_distributed(cfg, launcher)
    assert 'model_wrapper_cfg' not in cfg
