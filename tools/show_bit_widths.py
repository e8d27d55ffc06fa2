"""Print the bit widths that the DGMSHook of a config gives each layer.

Builds the config's detector without loading weights, converts it as
DGMSHook would at the start of training, and prints the number of quantized
layers and weights, the average bits per weight and the share of each bit
width. Nothing is trained, so COCO and checkpoints are not needed.

Examples:
    python tools/show_bit_widths.py configs/dgms/*.py
    python tools/show_bit_widths.py configs/dgms/retinanet_r50_mixed.py --layers
"""
import argparse
import os.path as osp
import sys

import warning_filters  # noqa: F401  (before mmengine, mmcv and mmdet)

from mmengine.config import Config
from mmengine.registry import HOOKS, init_default_scope

import mmdgms  # noqa: F401  (registers DGMSHook and DGMSConv)
from mmdgms import DGMSHook, convert_model
from mmdgms.convert import dgms_layers
from mmdgms.stats import bit_width_stats


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('configs', nargs='+', help='config files with a '
                        'DGMSHook in custom_hooks')
    parser.add_argument('--layers', action='store_true',
                        help='also print every quantized layer with its bits '
                        'and number of weights')
    return parser.parse_args(argv)


def dgms_hook_of(cfg, path: str) -> DGMSHook:
    """Build the config's one DGMSHook, which also validates its settings."""
    hooks = [
        h for h in cfg.get('custom_hooks', []) if h.get('type') == 'DGMSHook'
    ]
    if len(hooks) != 1:
        raise SystemExit(
            f'error: {path} has {len(hooks)} DGMSHook entries in '
            'custom_hooks; a DGMS config has exactly one (see '
            'configs/dgms/retinanet_r50_4bit.py). Pass a DGMS config')
    return HOOKS.build(hooks[0])


def describe(path: str, show_layers: bool) -> str:
    """Return the bit-width summary of one config as text."""
    cfg = Config.fromfile(path)
    hook = dgms_hook_of(cfg, path)
    init_default_scope(cfg.get('default_scope', 'mmdet'))
    from mmdet.registry import MODELS
    model = MODELS.build(cfg.model)
    convert_model(model, hook.dgms_cfg)

    stats = bit_width_stats(model)
    shares = '; '.join(
        f'{bits} bits: {stats["layers_per_bits"][bits]} layers, '
        f'{100 * params / stats["params"]:.1f} % of weights'
        for bits, params in stats['params_per_bits'].items())
    lines = [
        f'{osp.basename(path)}: {stats["layers"]} layers, '
        f'{stats["params"] / 1e6:.2f} M weights, '
        f'{stats["avg_bits"]:.3f} bits per weight ({shares})'
    ]
    if show_layers:
        for name, layer in dgms_layers(model).items():
            lines.append(f'  {name:<48} {layer.bits:>2} bits '
                         f'{layer.weight.numel():>10} weights')
    return '\n'.join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    for index, path in enumerate(args.configs, start=1):
        if not osp.isfile(path):
            raise SystemExit(f'config file not found: {path}')
        print(f'[{index}/{len(args.configs)}] building {path}',
              file=sys.stderr)
        print(describe(path, args.layers), flush=True)
    return 0


if __name__ == '__main__':
    sys.exit(main())
