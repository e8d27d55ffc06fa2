"""Evaluate a packed detector (COCO mAP) through the C++ mobile runtime.

Preprocessing runs in Python with the config's test pipeline and the
detector's data_preprocessor; every preprocessed image goes through the
runtime (deploy_arm/, via ctypes), which runs the packed graph and the
post-processing; its detections are scored by the config's evaluator.

Example:
    python tools/test_runtime.py configs/trees/retinanet_mnv2_fpn_trees_dgms4.py \\
        work_dirs/demo/dgms4.dgms --threads 2
"""
import argparse
import os.path as osp
import sys

import warning_filters  # noqa: F401  (before mmengine, mmcv and mmdet)

from mmengine.config import Config, DictAction

from mmdgms.deploy_arm import RuntimeDetector, RuntimeFailure, attach_runtime
from mmdgms.pack import PackedFormatError, load_packed_detector
from test_packed import _check_classes, run_test


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('config', help='config whose test_dataloader and '
                        'test_evaluator to use')
    parser.add_argument('packed', help='packed file written by tools/pack.py')
    parser.add_argument('--threads', type=int, default=1,
                        help='threads of the runtime (default: 1)')
    parser.add_argument('--quant-winograd', type=int, metavar='KIB',
                        help='largest Winograd filters, in KiB, that a '
                        'quantized 3x3 stride-1 layer keeps and runs on its '
                        'decoded weights; 0 runs the codebook kernels only '
                        '(0 to 1048576; default: the runtime\'s, 1024)')
    parser.add_argument('--library',
                        help='path of libdgms_model_c.so (default: build '
                        'deploy_arm/ with CMake)')
    parser.add_argument('--work-dir',
                        help='folder for the evaluation logs; default: '
                        'work_dirs/<packed file name>_runtime')
    parser.add_argument('--out',
                        help='also dump the raw detections to this .pkl file')
    parser.add_argument('--cfg-options', nargs='+', action=DictAction,
                        help='override config entries')
    args = parser.parse_args(argv)
    # Out-of-range values are command-line errors, like unparsable ones.
    if not 1 <= args.threads <= 256:
        parser.error(f'--threads is {args.threads}, expected 1 to 256')
    if args.quant_winograd is not None and not (
            0 <= args.quant_winograd <= 1 << 20):
        parser.error(f'--quant-winograd is {args.quant_winograd}, expected '
                     '0 to 1048576 KiB')
    return args


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
        # The Python detector supplies the data preprocessor; its predict
        # is replaced by the runtime below.
        model, packed = load_packed_detector(args.packed)
        runtime = RuntimeDetector(
            args.packed, args.threads, args.library,
            quant_winograd_max_bytes=(
                None if args.quant_winograd is None
                else args.quant_winograd * 1024))
    except (PackedFormatError, RuntimeFailure) as error:
        raise SystemExit(f'error: {error}') from None
    _check_classes(cfg, packed.meta.get('classes'), args.packed)
    attach_runtime(model, runtime)

    work_dir = args.work_dir or osp.join(
        'work_dirs', osp.splitext(osp.basename(args.packed))[0] + '_runtime')
    run_test(cfg, model, work_dir, args.out, args.config)


if __name__ == '__main__':
    sys.exit(main())
