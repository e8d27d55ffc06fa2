"""Plot each DGMS layer's weight histogram with its learned Gaussian mixture.

One panel per quantized conv layer: the histogram of the latent weights,
every mixture component as pi_k N(w | mu_k, sigma_k) on the same density
scale, and the codebook values. --before adds the histogram of another
checkpoint's weights, by default the full-precision load_from of the config,
to show how DGMS training moved the weights.

Examples:
    python tools/analysis/plot_mixture.py \\
        configs/trees/retinanet_mnv2_fpn_trees_dgms4.py \\
        work_dirs/demo/dgms4/epoch_6.pth -o dgms4_mixtures.png
    python tools/analysis/plot_mixture.py CONFIG CKPT -o OUT.png --before
    python tools/analysis/plot_mixture.py CONFIG CKPT -o OUT.png \\
        --before work_dirs/demo/fp/epoch_20.pth
"""
import argparse
import os.path as osp
import sys

# The warning filters that every tool installs live in tools/.
sys.path.append(osp.dirname(osp.dirname(osp.abspath(__file__))))
import warning_filters  # noqa: F401  (before mmengine and mmdet)

import torch

import mmdgms  # noqa: F401  (registers DGMS parts and safe checkpoint loading)
from mmdgms.analysis import plot_mixtures
from mmdgms.apis import (CheckpointMismatchError, init_detector,
                         read_checkpoint_summary)
from mmdgms.fileio import atomic_output


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('config', help='the DGMS config of the checkpoint')
    parser.add_argument('checkpoint', help='a checkpoint of a DGMS run')
    parser.add_argument('-o', '--out', required=True,
                        help='PNG file to write')
    parser.add_argument(
        '--before', nargs='?', const='load_from', default=None,
        help="also outline the weights of this checkpoint; without a value, "
        "those of the config's load_from (the full-precision start)")
    parser.add_argument('--cols', type=int, default=6,
                        help='panels per row (default: 6)')
    return parser.parse_args(argv)


def load_before_weights(path: str, names) -> dict:
    """Return layer name -> weight tensor from a checkpoint's state dict."""
    if not osp.isfile(path):
        raise SystemExit(f'--before checkpoint not found: {path}')
    checkpoint = torch.load(path, map_location='cpu', weights_only=True,
                            mmap=True)
    state_dict = checkpoint.get('state_dict', checkpoint)
    return {
        name: state_dict[f'{name}.weight']
        for name in names if f'{name}.weight' in state_dict
    }


def main(argv=None):
    args = parse_args(argv)
    if not args.out.lower().endswith('.png'):
        raise SystemExit(f'--out must end with .png, got {args.out}')

    try:
        summary = read_checkpoint_summary(args.checkpoint)
    except (FileNotFoundError, ValueError) as error:
        raise SystemExit(f'error: {error}') from None
    if not summary.is_dgms:
        raise SystemExit(
            f'error: {args.checkpoint} has no DGMS mixture in its state_dict, '
            'so it is not a checkpoint of a DGMS run and there is nothing to '
            'plot; give a checkpoint written by DGMS training and its config')
    print(f'loading {args.checkpoint} ({len(summary.dgms_layers)} DGMS '
          'layers)', file=sys.stderr)
    try:
        model = init_detector(args.config, args.checkpoint, device='cpu')
    except CheckpointMismatchError as error:
        raise SystemExit(f'error: {error}') from None

    before_weights = None
    if args.before is not None:
        before = args.before
        if before == 'load_from':
            before = model.cfg.get('load_from')
            if not before:
                raise SystemExit('--before without a value uses the '
                                 "config's load_from, which is not set; "
                                 'pass a checkpoint path')
        print(f'loading the weights to compare with from {before}',
              file=sys.stderr)
        before_weights = load_before_weights(before, summary.dgms_layers)

    print(f'drawing {len(summary.dgms_layers)} panels', file=sys.stderr)
    try:
        with atomic_output(args.out) as temp_name:
            layout = plot_mixtures(model, temp_name, before_weights,
                                   cols=args.cols)
    except ValueError as error:
        raise SystemExit(f'error: {error}') from None
    print(f'wrote {args.out}: {layout.panels} panels in {layout.rows} rows '
          f'x {layout.cols} columns')
    return layout


if __name__ == '__main__':
    main()
