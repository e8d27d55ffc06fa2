"""Evaluate a packed detector (COCO mAP) with the test data of a config.

The detector comes from the packed file alone. The config supplies only the
test dataloader, the evaluator and the logging settings, so its model
section and DGMSHook are ignored.

Example:
    python tools/test_packed.py configs/trees/retinanet_mnv2_fpn_trees_dgms4.py \\
        work_dirs/demo/dgms4.dgms
"""
import argparse
import os.path as osp
import sys

import warning_filters  # noqa: F401  (before mmengine, mmcv and mmdet)

from mmengine.config import Config, DictAction
from mmengine.runner import Runner

from mmdgms.pack import PackedFormatError, load_packed_detector


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('config', help='config whose test_dataloader and '
                        'test_evaluator to use')
    parser.add_argument('packed', help='packed file written by tools/pack.py')
    parser.add_argument('--work-dir',
                        help='folder for the evaluation logs; default: '
                        'work_dirs/<packed file name>')
    parser.add_argument('--out',
                        help='also dump the raw detections to this .pkl file')
    parser.add_argument('--cfg-options', nargs='+', action=DictAction,
                        help='override config entries')
    return parser.parse_args(argv)


def _check_classes(cfg: Config, packed_classes, packed_path: str) -> None:
    dataset = cfg.test_dataloader.get('dataset', {})
    classes = (dataset.get('metainfo') or {}).get('classes')
    if classes is not None and packed_classes is not None and tuple(
            classes) != tuple(packed_classes):
        raise SystemExit(
            f'error: {packed_path} detects {len(packed_classes)} classes '
            f'{tuple(packed_classes)[:5]}, but the test data of the config '
            f'has {len(classes)} classes {tuple(classes)[:5]}. Use the '
            'config of the dataset the model was trained on')


def build_test_runner(cfg: Config, model, work_dir: str) -> Runner:
    """Return a Runner that tests ``model`` with the data of ``cfg``."""
    custom_hooks = [
        h for h in cfg.get('custom_hooks', []) or []
        if str(h.get('type', '')).split('.')[-1] != 'DGMSHook'
    ]
    return Runner(model=model,
                  work_dir=work_dir,
                  test_dataloader=cfg.test_dataloader,
                  test_evaluator=cfg.test_evaluator,
                  test_cfg=cfg.get('test_cfg') or dict(type='TestLoop'),
                  default_hooks=cfg.get('default_hooks'),
                  custom_hooks=custom_hooks,
                  env_cfg=cfg.get('env_cfg', dict(dist_cfg=dict(
                      backend='nccl'))),
                  log_processor=cfg.get('log_processor'),
                  log_level=cfg.get('log_level', 'INFO'),
                  visualizer=cfg.get('visualizer'),
                  default_scope=cfg.get('default_scope', 'mmdet'),
                  launcher='none',
                  cfg=cfg)


def main(argv=None) -> None:
    args = parse_args(argv)
    for path, kind in ((args.config, 'config'), (args.packed, 'packed')):
        if not osp.isfile(path):
            raise SystemExit(f'error: {kind} file not found: {path}')
    if args.out is not None and not args.out.endswith(('.pkl', '.pickle')):
        raise SystemExit(f'error: --out must end with .pkl, got {args.out}')

    cfg = Config.fromfile(args.config)
    if args.cfg_options:
        cfg.merge_from_dict(args.cfg_options)
    try:
        model, packed = load_packed_detector(args.packed)
    except PackedFormatError as error:
        raise SystemExit(f'error: {error}') from None
    _check_classes(cfg, packed.meta.get('classes'), args.packed)

    work_dir = args.work_dir or osp.join(
        'work_dirs', osp.splitext(osp.basename(args.packed))[0])
    run_test(cfg, model, work_dir, args.out, args.config)


def run_test(cfg: Config, model, work_dir: str, out, config_path: str):
    """Test ``model`` on the data of ``cfg``, optionally dumping the
    detections to the .pkl file ``out``; a missing dataset file is one
    error line instead of a traceback."""
    try:
        runner = build_test_runner(cfg, model, work_dir)
        if out is not None:
            from mmdet.evaluation import DumpDetResults
            runner.test_evaluator.metrics.append(
                DumpDetResults(out_file_path=out))
        runner.test()
    except FileNotFoundError as error:
        # Typically the config's annotation file or images.
        raise SystemExit(
            f'error: {error}. The test data of {config_path} is missing: '
            'prepare it, or point the config at it with --cfg-options '
            '(test_dataloader.dataset.data_root, test_evaluator.ann_file)'
        ) from None


if __name__ == '__main__':
    sys.exit(main())
