"""Benchmark a DGMS training step against full precision.

For each detector config and bit width it measures, in a fresh process per
variant, one training step (forward, loss, backward) on a 512x512 image,
batch 1:

- ``fp``: the full-precision detector;
- ``plain``: DGMS with plain autograd (every K x N intermediate kept for the
  backward pass, as a direct port of the published formulation does);
- ``chunked``: DGMS with mmdgms' chunked torch implementation;
- ``fused``: DGMS with mmdgms' compiled CPU kernels (the default).

It also times the k-means initialisation of all quantized layers. Weights
are randomly initialised: speed and memory do not depend on their values
beyond the mixture statistics. Peak memory is the process's peak resident
set on CPU (VmHWM) and ``torch.cuda.max_memory_allocated`` on a GPU.

Example:
    python tools/benchmark_dgms.py --bits 4 2 --steps 2
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CONFIGS = [
    'configs/dgms/retinanet_r50_4bit.py',
    'configs/dgms/faster_rcnn_r50_4bit.py',
]
VARIANTS = ('fp', 'plain', 'chunked', 'fused')


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--configs', nargs='+', default=DEFAULT_CONFIGS,
                        help='detector configs with a DGMSHook')
    parser.add_argument('--bits', nargs='+', type=int, default=[4, 2],
                        help='bit widths to measure')
    parser.add_argument('--variants', nargs='+', default=list(VARIANTS),
                        choices=VARIANTS, help='what to measure')
    parser.add_argument('--steps', type=int, default=3,
                        help='timed training steps after one warm-up step; '
                        'the median is reported')
    parser.add_argument('--size', type=int, default=512,
                        help='input image side in pixels')
    parser.add_argument('--device', default='cpu',
                        help="'cpu' or 'cuda'")
    parser.add_argument('--out', help='also write the results as JSON here')
    parser.add_argument('--worker', help=argparse.SUPPRESS)
    return parser.parse_args()


def process_memory_bytes(field: str) -> int:
    """Return a memory field of /proc/self/status (VmRSS, VmHWM) in bytes."""
    with open('/proc/self/status') as f:
        for line in f:
            if line.startswith(f'{field}:'):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f'{field} not found in /proc/self/status')


def peak_memory_bytes(device: str) -> int:
    import torch
    if device.startswith('cuda'):
        return torch.cuda.max_memory_allocated()
    return process_memory_bytes('VmHWM')


def current_memory_bytes(device: str) -> int:
    import torch
    if device.startswith('cuda'):
        return torch.cuda.memory_allocated()
    return process_memory_bytes('VmRSS')


def run_worker(spec: dict) -> dict:
    """Measure one (config, bits, variant) in this process."""
    import torch
    from mmdet.registry import MODELS
    from mmdet.structures import DetDataSample
    from mmengine.config import Config
    from mmengine.registry import init_default_scope
    from mmengine.structures import InstanceData

    import mmdgms  # noqa: F401
    from mmdgms.convert import DGMSConfig, convert_model

    init_default_scope('mmdet')
    torch.manual_seed(0)
    device = spec['device']
    cfg = Config.fromfile(str(REPO_ROOT / spec['config']))
    cfg.model.backbone.init_cfg = None
    model = MODELS.build(cfg.model)
    model.init_weights()

    result = dict(spec)
    if spec['variant'] != 'fp':
        layers = convert_model(model, DGMSConfig(bits=spec['bits']))
        start = time.perf_counter()
        for layer in layers.values():
            layer.mixture.init_from_weights(layer.weight)
            layer.mixture.implementation = spec['variant']
        result['init_seconds'] = time.perf_counter() - start
        result['quantized_layers'] = len(layers)
        result['quantized_weights'] = sum(
            layer.weight.numel() for layer in layers.values())
    model.to(device).train()

    size = spec['size']
    image = torch.randn(1, 3, size, size, device=device)
    sample = DetDataSample(metainfo=dict(
        img_shape=(size, size), pad_shape=(size, size),
        batch_input_shape=(size, size), scale_factor=(1.0, 1.0)))
    sample.gt_instances = InstanceData(
        bboxes=torch.tensor([[40.0, 60.0, 200.0, 220.0],
                             [260.0, 100.0, 420.0, 380.0]], device=device),
        labels=torch.tensor([0, 1], device=device))

    def step():
        model.zero_grad(set_to_none=True)
        losses = model.loss(image, [sample])
        total = sum(
            value.sum() if torch.is_tensor(value) else sum(v.sum()
                                                           for v in value)
            for key, value in losses.items() if 'loss' in key)
        total.backward()
        if device.startswith('cuda'):
            torch.cuda.synchronize()

    step()  # warm-up: allocator, oneDNN primitives, lazy initialisation
    if device.startswith('cuda'):
        torch.cuda.reset_peak_memory_stats()
    baseline = current_memory_bytes(device)
    times = []
    for _ in range(spec['steps']):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    result['step_seconds'] = statistics.median(times)
    result['all_step_seconds'] = times
    result['peak_bytes'] = peak_memory_bytes(device)
    result['baseline_bytes'] = baseline
    return result


def measure(spec: dict) -> dict:
    """Run one measurement in a fresh process, so peaks do not mix."""
    command = [sys.executable, __file__, '--worker', json.dumps(spec)]
    proc = subprocess.run(command, capture_output=True, text=True,
                          cwd=REPO_ROOT)
    if proc.returncode != 0:
        return dict(spec, error=proc.stderr.strip().splitlines()[-1]
                    if proc.stderr.strip() else f'exit {proc.returncode}')
    return json.loads(proc.stdout.strip().splitlines()[-1])


def format_row(r: dict, fp: dict) -> str:
    name = Path(r['config']).stem
    if 'error' in r:
        return f'{name:<28} {r["bits"]:>4} {r["variant"]:<8} failed: {r["error"]}'
    ratio_t = r['step_seconds'] / fp['step_seconds'] if fp else float('nan')
    ratio_m = r['peak_bytes'] / fp['peak_bytes'] if fp else float('nan')
    init = f'{r["init_seconds"]:.2f}' if 'init_seconds' in r else '-'
    return (f'{name:<28} {r["bits"]:>4} {r["variant"]:<8} '
            f'{r["step_seconds"]:>8.2f} {ratio_t:>6.2f}x '
            f'{r["peak_bytes"] / 2**30:>8.2f} {ratio_m:>6.2f}x {init:>8}')


def main():
    args = parse_args()
    if args.worker:
        print(json.dumps(run_worker(json.loads(args.worker))))
        return

    import torch
    print(f'torch {torch.__version__}, {torch.get_num_threads()} threads, '
          f'device {args.device}, image {args.size}x{args.size}, batch 1',
          flush=True)
    header = (f'{"config":<28} {"bits":>4} {"variant":<8} {"step s":>8} '
              f'{"vs FP":>7} {"peak GiB":>8} {"vs FP":>7} {"init s":>8}')
    print(header)
    print('-' * len(header), flush=True)

    results = []
    for config in args.configs:
        fp = None
        if 'fp' in args.variants:
            fp = measure(dict(config=config, bits=32, variant='fp',
                              steps=args.steps, size=args.size,
                              device=args.device))
            results.append(fp)
            print(format_row(fp, fp), flush=True)
            if 'error' in fp:
                fp = None
        for bits in args.bits:
            for variant in VARIANTS[1:]:
                if variant not in args.variants:
                    continue
                r = measure(dict(config=config, bits=bits, variant=variant,
                                 steps=args.steps, size=args.size,
                                 device=args.device))
                results.append(r)
                print(format_row(r, fp), flush=True)

    if args.out:
        with open(args.out, 'w') as f:
            json.dump(results, f, indent=2)


if __name__ == '__main__':
    main()
