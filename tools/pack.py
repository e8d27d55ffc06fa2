"""Pack a DGMS-trained detector into the file the mobile runtime loads.

Examples:
    python tools/pack.py CONFIG CHECKPOINT -o model.dgms --report
    python tools/pack.py CONFIG CHECKPOINT --report   # report only
    python tools/pack.py CONFIG CHECKPOINT -o model.dgms --entropy \\
        --weight-dtype f16

The packed file is parsed back and checked against the PyTorch detector
before it is written (``--no-verify`` skips this); it is written atomically.
The format is specified in docs/packed-format.md.
"""
import argparse
import sys
import time
from typing import List

import warning_filters  # noqa: F401  (before mmengine, mmcv and mmdet)

from mmdgms.pack import (PackedFormatError, PackError, UnsupportedModelError,
                         pack_checkpoint)
from mmdgms.pack.writer import LayerReport


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('config', help='the DGMS config the checkpoint was '
                        'trained with')
    parser.add_argument('checkpoint', help='a DGMS checkpoint (.pth)')
    parser.add_argument('-o', '--out',
                        help='path of the packed file to write; may be left '
                        'out with --report to print the compression report '
                        'only')
    parser.add_argument('--weight-dtype', choices=['f32', 'f16'],
                        default='f32',
                        help='storage of the layers kept in full precision '
                        '(default: f32, which reproduces the detector '
                        'exactly)')
    parser.add_argument('--entropy', action='store_true',
                        help='entropy-code the index streams (rANS) instead '
                        'of dense bit packing')
    parser.add_argument('--report', action='store_true',
                        help='print per-layer bits, sparsity, parameters, '
                        'bytes and compression ratio')
    parser.add_argument('--no-verify', action='store_true',
                        help='skip comparing the packed graph with the '
                        'PyTorch detector before writing')
    return parser.parse_args(argv)


def _ratio(fp32_bytes: int, stored: int) -> str:
    return f'{fp32_bytes / stored:.1f}x' if stored else '-'


def format_report(reports: List[LayerReport], file_size: int,
                  entropy: bool) -> str:
    """Return the per-layer and total size table."""
    header = (f'{"layer":<44} {"kind":<9} {"bits":>4} {"params":>9} '
              f'{"sparsity":>8} {"bytes":>9} {"ratio":>6}')
    if entropy:
        header += f' {"bits/w":>7} {"entropy":>7}'
    lines = [header, '-' * len(header)]
    for r in reports:
        sparsity = f'{r.sparsity:.3f}' if r.sparsity is not None else '-'
        line = (f'{r.name[-44:]:<44} {r.kind:<9} {r.bits:>4} {r.params:>9} '
                f'{sparsity:>8} {r.stored_bytes:>9} '
                f'{_ratio(r.fp32_bytes, r.stored_bytes):>6}')
        if entropy and r.kind == 'quantized':
            line += (f' {8 * r.index_bytes / r.weights:>7.3f} '
                     f'{r.entropy_bits / r.weights:>7.3f}')
        lines.append(line)
    lines.append('-' * len(header))

    quantized = [r for r in reports if r.kind == 'quantized']
    dense = [r for r in reports if r.kind == 'dense']
    fp32 = sum(r.fp32_bytes for r in reports)
    content = sum(r.content_bytes for r in reports)
    q_weights = sum(r.weights for r in quantized)
    lines.append(
        f'quantized: {len(quantized)} layers, {q_weights} weights, '
        f'{sum(r.bits * r.weights for r in quantized) / max(q_weights, 1):.2f}'
        f' bits per weight on average, sparsity '
        f'{sum(r.sparsity * r.weights for r in quantized) / max(q_weights, 1):.3f}')
    lines.append(f'full precision: {len(dense)} layers, '
                 f'{sum(r.weights for r in dense)} weights')
    lines.append(f'FP32 size of all parameters: {fp32} bytes')
    lines.append(f'exact size of the contents (indices at b bits, '
                 f'codebooks, scales, biases, FP layers): {content} bytes')
    lines.append(f'packed file: {file_size} bytes, {fp32 / file_size:.2f}x '
                 f'smaller than FP32, {100 * (file_size / content - 1):.2f}% '
                 'above the exact contents')
    if entropy and quantized:
        index_bits = 8 * sum(r.index_bytes for r in quantized)
        bound = sum(r.entropy_bits for r in quantized)
        lines.append(
            f'entropy coding: {index_bits / q_weights:.3f} bits per weight, '
            f'empirical entropy {bound / q_weights:.3f} '
            f'({100 * (index_bits / bound - 1):.2f}% above the bound)')
    return '\n'.join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.out is None and not args.report:
        print('error: give -o OUT to write the packed file, or --report to '
              'print the compression report only', file=sys.stderr)
        return 2
    start = time.time()
    print(f'packing {args.checkpoint} with {args.config} ...', flush=True)
    try:
        result = pack_checkpoint(args.config, args.checkpoint, args.out,
                                 weight_dtype=args.weight_dtype,
                                 entropy=args.entropy,
                                 verify=not args.no_verify)
    except (PackError, PackedFormatError, UnsupportedModelError,
            FileNotFoundError) as error:
        print(f'error: {error}', file=sys.stderr)
        return 1
    if args.report:
        print(format_report(result.reports, result.file_size, args.entropy))
    if result.max_abs_diff is not None:
        print('verified: packed graph outputs differ from PyTorch by at most '
              f'{result.max_abs_diff:.3g}')
    if args.out is None:
        print(f'packed {result.file_size} bytes in memory in '
              f'{time.time() - start:.1f} s (no file written: no -o given)')
    else:
        print(f'wrote {result.path} ({result.file_size} bytes) in '
              f'{time.time() - start:.1f} s')
    return 0


if __name__ == '__main__':
    sys.exit(main())
