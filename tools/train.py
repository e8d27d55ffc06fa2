"""Train a detector, with or without DGMS, from an MMDetection config.

Examples:
    python tools/train.py configs/dgms/retinanet_r50_4bit.py
    python tools/train.py CONFIG --resume            # latest checkpoint
    python tools/train.py CONFIG --resume PATH.pth   # a given checkpoint
"""
import argparse
import os.path as osp

from mmengine.config import Config, DictAction
from mmengine.registry import RUNNERS
from mmengine.runner import Runner

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

    build_runner(cfg).train()


if __name__ == '__main__':
    main()
