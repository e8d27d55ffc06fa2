"""Measure packed file sizes: dense bit packing and rANS entropy coding.

For each model it prints the packed size against the exact size of the
contents: indices at b bits, codebooks, scales, biases and full-precision
layers. With entropy coding it also prints the index bits per weight
against the empirical entropy of the indices, which bounds any static
per-layer coder.

Models:
- ``demo4`` / ``demo2``: the demo's 4-bit and 2-bit detectors (run
  tools/run_demo.py first; their work_dirs/demo checkpoints are read).
- ``r50``: RetinaNet-R50 4-bit from configs/dgms/retinanet_r50_4bit.py
  with random weights and k-means-initialised mixtures; sizes do not
  depend on training.

Example:
    python tools/benchmark_pack.py --models demo4 demo2 r50
"""
import argparse
import os.path as osp
import sys
import time

import warning_filters  # noqa: F401  (before mmengine, mmcv and mmdet)

import torch
from mmengine.config import Config, ConfigDict
from mmengine.registry import HOOKS

from mmdgms.convert import convert_model, dgms_layers
from mmdgms.pack import load_dgms_detector, read_packed
from mmdgms.pack.detectors import trace_detector
from mmdgms.pack.packer import (build_model, compare_outputs, describe_model,
                                 plain_model_config)
from mmdgms.pack.writer import encode_packed

REPO_ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
DEMO = {
    'demo4': ('configs/trees/retinanet_mnv2_fpn_trees_dgms4.py',
              'work_dirs/demo/dgms4/epoch_6.pth'),
    'demo2': ('configs/trees/retinanet_mnv2_fpn_trees_dgms2.py',
              'work_dirs/demo/dgms2/epoch_6.pth'),
}
R50_CONFIG = 'configs/dgms/retinanet_r50_4bit.py'


def random_r50(bits: int = 4):
    """Return (model, cfg) of RetinaNet-R50 at ``bits`` bits (4 by default)
    with random weights and mixtures initialised from them."""
    cfg = Config.fromfile(osp.join(REPO_ROOT, R50_CONFIG))
    # Build the full-precision detector and convert it at the requested bit
    # width (the config's DGMSDetector entry would convert at 4 bits).
    cfg.model = ConfigDict(plain_model_config(cfg.model.to_dict()))
    torch.manual_seed(0)
    model = build_model(cfg)
    hook_cfg = [h for h in cfg.custom_hooks if h['type'] == 'DGMSHook'][0]
    convert_model(model, HOOKS.build(dict(hook_cfg, bits=bits)).dgms_cfg)
    for layer in dgms_layers(model).values():
        layer.mixture.init_from_weights(layer.weight)
    return model.eval(), cfg


def load(name):
    if name == 'r50':
        model, cfg = random_r50()
        return model, cfg, {}
    config, checkpoint = (osp.join(REPO_ROOT, p) for p in DEMO[name])
    if not osp.isfile(checkpoint):
        raise SystemExit(f'error: {checkpoint} not found; run '
                         'tools/run_demo.py first to train the demo models')
    return load_dgms_detector(config, checkpoint)


def measure(name: str) -> list:
    start = time.time()
    model, cfg, meta = load(name)
    graphs, info = trace_detector(model)
    meta_obj = describe_model(cfg, meta, graphs, info, name)
    rows = []
    for entropy in (False, True):
        data, reports = encode_packed(graphs, meta_obj, 'f32', entropy)
        packed = read_packed(data)
        diff = compare_outputs(model, packed.graphs, info, size=128)
        quantized = [r for r in reports if r.kind == 'quantized']
        weights = sum(r.weights for r in quantized)
        content = sum(r.content_bytes for r in reports)
        row = dict(model=name,
                   coding='rANS' if entropy else 'dense',
                   weights=weights,
                   bits=sum(r.bits * r.weights for r in quantized) / weights,
                   fp32=sum(r.fp32_bytes for r in reports),
                   content=content,
                   size=len(data),
                   over_content=100 * (len(data) / content - 1),
                   max_diff=diff)
        if entropy:
            index_bits = 8 * sum(r.index_bytes for r in quantized)
            bound = sum(r.entropy_bits for r in quantized)
            row.update(index_bits=index_bits / weights,
                       entropy=bound / weights,
                       over_bound=100 * (index_bits / bound - 1))
        rows.append(row)
    print(f'{name}: measured in {time.time() - start:.1f} s', flush=True)
    return rows


def format_rows(rows: list) -> str:
    lines = [
        '| model | coding | quantized weights | bits | FP32 MB | exact '
        'contents MB | packed MB | packed vs contents | index bits/weight '
        '| entropy bits/weight | above entropy |',
        '|---|---|---|---|---|---|---|---|---|---|---|'
    ]
    for r in rows:
        extra = (f"{r['index_bits']:.3f} | {r['entropy']:.3f} | "
                 f"{r['over_bound']:+.2f}%" if 'entropy' in r else '- | - | -')
        lines.append(
            f"| {r['model']} | {r['coding']} | {r['weights'] / 1e6:.2f} M | "
            f"{r['bits']:.1f} | {r['fp32'] / 1e6:.2f} | "
            f"{r['content'] / 1e6:.3f} | {r['size'] / 1e6:.3f} | "
            f"{r['over_content']:+.2f}% | {extra} |")
    return '\n'.join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--models', nargs='+', default=['demo4', 'demo2',
                                                        'r50'],
                        choices=['demo4', 'demo2', 'r50'],
                        help='models to measure (default: all)')
    args = parser.parse_args(argv)
    rows = []
    for name in args.models:
        rows.extend(measure(name))
    print(format_rows(rows))
    worst = max(abs(r['max_diff']) for r in rows)
    print(f'largest difference between packed and PyTorch head outputs: '
          f'{worst:.3g}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
