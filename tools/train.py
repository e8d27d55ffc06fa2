"""Train a detector, with or without DGMS, from an MMDetection config.

Examples:
    python tools/train.py configs/dgms/retinanet_r50_4bit.py
    bash tools/dist_train.sh CONFIG 8                # 8 GPUs
    python tools/train.py CONFIG --resume            # latest checkpoint
    python tools/train.py CONFIG --resume PATH.pth   # a given checkpoint
"""
import argparse
import datetime
import os.path as osp

import warning_filters  # noqa: F401  (before mmengine, mmcv and mmdet)

import torch
import torch.distributed as torch_dist
from mmengine.config import Config, DictAction
from mmengine.logging import print_log
from mmengine.registry import MODEL_WRAPPERS, RUNNERS
from mmengine.runner import Runner
from torch.nn.parallel import DistributedDataParallel

import mmdgms  # noqa: F401  (registers DGMS parts and safe checkpoint loading)


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('config', help='path of the training config')
    parser.add_argument('--work-dir',
                        help='folder for logs and checkpoints; default: '
                        'work_dirs/<config name>')
    parser.add_argument(
        '--resume', nargs='?', const='auto', default=None,
        help='resume training: without a value from the latest checkpoint '
        'in the work dir, or from the given checkpoint path')
    parser.add_argument('--amp', action='store_true',
                        help='train with automatic mixed precision')
    parser.add_argument('--cfg-options', nargs='+', action=DictAction,
                        help='override config entries, e.g. '
                        'train_cfg.max_epochs=2 load_from=ckpt.pth')
    parser.add_argument('--launcher', default='none',
                        choices=['none', 'pytorch', 'slurm', 'mpi'],
                        help='job launcher for distributed training')
    parser.add_argument('--local-rank', '--local_rank', type=int, default=0)
    return parser.parse_args()


def build_runner(cfg):
    """Build the runner named by ``cfg.runner_type``, else the default one."""
    if 'runner_type' in cfg:
        return RUNNERS.build(cfg)
    return Runner.from_cfg(cfg)


def setup_cpu_distributed(cfg, launcher: str) -> None:
    """Prepare multi-process training on a machine without CUDA.

    MMEngine 0.10.7 cannot do this alone: its ``init_dist`` calls
    ``torch.cuda.set_device``, and its default DDP wrapper passes
    ``device_ids=[LOCAL_RANK]``, which DDP rejects for a CPU model. So this
    initialises the gloo process group from the launcher's environment
    variables (the runner then skips its own initialisation) and sets
    ``device_ids=None`` in ``model_wrapper_cfg``.
    """
    if launcher == 'none' or torch.cuda.is_available():
        return
    if launcher != 'pytorch':
        raise SystemExit(
            f'--launcher {launcher} without CUDA is not supported. Use '
            '--launcher pytorch (tools/dist_train.sh) for CPU processes')
    dist_cfg = dict(cfg.get('env_cfg', {}).get('dist_cfg', {}))
    backend = dist_cfg.pop('backend', None)
    if backend != 'gloo':
        raise SystemExit(
            'distributed training without CUDA needs the gloo backend, but '
            f'env_cfg.dist_cfg.backend={backend!r}. Add --cfg-options '
            'env_cfg.dist_cfg.backend=gloo')

    if 'timeout' in dist_cfg:
        dist_cfg['timeout'] = datetime.timedelta(seconds=dist_cfg['timeout'])
    torch_dist.init_process_group(backend='gloo', **dist_cfg)

    wrapper_cfg = cfg.get('model_wrapper_cfg')
    if wrapper_cfg is None:
        # MMEngine's defaults for a config without model_wrapper_cfg.
        wrapper_cfg = dict(
            type='MMDistributedDataParallel',
            broadcast_buffers=False,
            find_unused_parameters=cfg.get('find_unused_parameters', False))
    wrapper_cfg.setdefault('type', 'MMDistributedDataParallel')
    wrapper_type = MODEL_WRAPPERS.get(wrapper_cfg['type'])
    if wrapper_type is not None and issubclass(wrapper_type,
                                               DistributedDataParallel):
        wrapper_cfg['device_ids'] = None
    cfg.model_wrapper_cfg = wrapper_cfg
    print_log(
        f'CPU distributed training: rank {torch_dist.get_rank()} of '
        f'{torch_dist.get_world_size()}, gloo backend, '
        f'model wrapper {wrapper_cfg["type"]}', logger='current')


def main():
    args = parse_args()
    if not osp.isfile(args.config):
        raise SystemExit(f'config file not found: {args.config}')
    cfg = Config.fromfile(args.config)
    if args.cfg_options:
        cfg.merge_from_dict(args.cfg_options)
    cfg.launcher = args.launcher
    cfg.work_dir = args.work_dir or cfg.get('work_dir') or osp.join(
        'work_dirs', osp.splitext(osp.basename(args.config))[0])

    if args.amp:
        cfg.optim_wrapper.type = 'AmpOptimWrapper'
        cfg.optim_wrapper.loss_scale = 'dynamic'
    if args.resume == 'auto':
        cfg.resume = True
        cfg.load_from = None
    elif args.resume is not None:
        if not osp.isfile(args.resume):
            raise SystemExit(f'--resume checkpoint not found: {args.resume}')
        cfg.resume = True
        cfg.load_from = args.resume

    setup_cpu_distributed(cfg, args.launcher)
    build_runner(cfg).train()


if __name__ == '__main__':
    main()
