"""Evaluate a checkpoint (COCO mAP for the COCO-style configs).

DGMS checkpoints are evaluated with hard (codebook) weights. A checkpoint
that does not fit the config (a DGMS checkpoint with a full-precision config,
or the other way round) is an error that names the config to use.

Example:
    python tools/test.py configs/dgms/retinanet_r50_4bit.py CKPT.pth
"""
import argparse
import os.path as osp

import warning_filters  # noqa: F401  (before mmengine, mmcv and mmdet)

from mmengine.config import Config, DictAction
from mmengine.model import is_model_wrapper

import mmdgms  # noqa: F401  (registers DGMS parts and safe checkpoint loading)
from mmdgms.apis import (CheckpointMismatchError, check_checkpoint_matches,
                         read_checkpoint_summary)
from train import build_runner


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('config', help='path of the config the checkpoint '
                        'was trained with')
    parser.add_argument('checkpoint', help='checkpoint file to evaluate')
    parser.add_argument('--work-dir',
                        help='folder for the evaluation logs; default: '
                        'work_dirs/<config name>')
    parser.add_argument('--out',
                        help='also dump the raw detections to this .pkl file')
    parser.add_argument('--cfg-options', nargs='+', action=DictAction,
                        help='override config entries')
    parser.add_argument('--launcher', default='none',
                        choices=['none', 'pytorch', 'slurm', 'mpi'],
                        help='job launcher for distributed testing')
    parser.add_argument('--local-rank', '--local_rank', type=int, default=0)
    return parser.parse_args()


def main():
    args = parse_args()
    for path, kind in ((args.config, 'config'), (args.checkpoint,
                                                 'checkpoint')):
        if not osp.isfile(path):
            raise SystemExit(f'{kind} file not found: {path}')
    if args.out is not None and not args.out.endswith(('.pkl', '.pickle')):
        raise SystemExit(f'--out must end with .pkl, got {args.out}')

    cfg = Config.fromfile(args.config)
    if args.cfg_options:
        cfg.merge_from_dict(args.cfg_options)
    cfg.launcher = args.launcher
    cfg.work_dir = args.work_dir or cfg.get('work_dir') or osp.join(
        'work_dirs', osp.splitext(osp.basename(args.config))[0])
    cfg.load_from = args.checkpoint
    cfg.resume = False

    runner = build_runner(cfg)
    model = runner.model.module if is_model_wrapper(
        runner.model) else runner.model
    try:
        check_checkpoint_matches(model,
                                 read_checkpoint_summary(args.checkpoint),
                                 cfg, args.config, hook_will_convert=True)
    except (CheckpointMismatchError, ValueError) as error:
        raise SystemExit(f'error: {error}') from None

    if args.out is not None:
        from mmdet.evaluation import DumpDetResults
        runner.test_evaluator.metrics.append(
            DumpDetResults(out_file_path=args.out))
    runner.test()


if __name__ == '__main__':
    main()
