"""Benchmark a DGMS training step against full precision.

For each detector config and bit width it measures, in a fresh process per
variant, training steps (forward, loss, backward) on a 512x512 image,
batch 1, and reports the median of ``--steps`` steps after one warm-up step,
in wall time and in CPU time of the process (all threads):

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
    python tools/benchmark_dgms.py --bits 4 2 --steps 3
"""
import argparse
import copy
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import warning_filters  # noqa: F401  (before mmengine, mmcv and mmdet)

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
    parser.add_argument('--threads', type=int,
                        help='intra-op threads of each measured process '
                        "(default: torch's default). With 1 thread the CPU "
                        'time includes no OpenMP spin-waiting, so it stays '
                        'meaningful on a machine shared with other jobs')
    parser.add_argument('--paired', action='store_true',
                        help='also time each DGMS variant alternately with '
                        'a full-precision copy of the model in the same '
                        'process and print the median per-pair ratios '
                        '(peak memory then includes both models)')
    parser.add_argument('--profile', action='store_true',
                        help='profile one more step of each variant and '
                        'print the operators with the most CPU time')
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
    from mmengine.config import Config, ConfigDict
    from mmengine.registry import init_default_scope
    from mmengine.structures import InstanceData

    import mmdgms  # noqa: F401
    from mmdgms.convert import DGMSConfig, convert_model

    init_default_scope('mmdet')
    if spec.get('threads'):
        torch.set_num_threads(spec['threads'])
    torch.manual_seed(0)
    device = spec['device']
    cfg = Config.fromfile(str(REPO_ROOT / spec['config']))
    # The DGMS configs build their model through DGMSDetector; benchmark
    # the full-precision detector and convert it here per variant.
    model_cfg = cfg.model.to_dict()
    if model_cfg['type'] == 'DGMSDetector':
        model_cfg['type'] = model_cfg.pop('detector_type')
        model_cfg.pop('dgms')
    model_cfg['backbone']['init_cfg'] = None
    model = MODELS.build(ConfigDict(model_cfg))
    model.init_weights()

    result = dict(spec)
    paired = spec.get('paired') and spec['variant'] != 'fp'
    fp_model = copy.deepcopy(model).to(device).train() if paired else None
    if spec['variant'] != 'fp':
        layers = convert_model(model, DGMSConfig(bits=spec['bits']))
        start, cpu_start = time.perf_counter(), time.process_time()
        for layer in layers.values():
            layer.mixture.init_from_weights(layer.weight)
            layer.mixture.implementation = spec['variant']
        result['init_seconds'] = time.perf_counter() - start
        result['init_cpu_seconds'] = time.process_time() - cpu_start
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

    def step(net=model):
        net.zero_grad(set_to_none=True)
        losses = net.loss(image, [sample])
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
    times, cpu_times = [], []
    for _ in range(spec['steps']):
        start, cpu_start = time.perf_counter(), time.process_time()
        step()
        times.append(time.perf_counter() - start)
        cpu_times.append(time.process_time() - cpu_start)
    result['step_seconds'] = statistics.median(times)
    result['all_step_seconds'] = times
    # CPU time of all threads of this process: less affected than wall time
    # by other processes on a shared machine.
    result['step_cpu_seconds'] = statistics.median(cpu_times)
    result['peak_bytes'] = peak_memory_bytes(device)
    result['baseline_bytes'] = baseline
    if paired:
        result.update(paired_ratios(step, fp_model, model, spec['steps']))
    if spec.get('profile'):
        result['profile_rows'] = profile_step(step)
    return result


def paired_ratios(step, fp_model, dgms_model, steps: int) -> dict:
    """Time full-precision and DGMS steps alternately in one process.

    Both models see the same load from other processes, so on a shared
    machine the median of the per-pair ratios varies less than the ratio of
    two medians measured in different processes.
    """
    step(fp_model)  # warm-up
    wall, cpu = [], []
    for _ in range(steps):
        pair = []
        for net in (fp_model, dgms_model):
            start, cpu_start = time.perf_counter(), time.process_time()
            step(net)
            pair.append((time.perf_counter() - start,
                         time.process_time() - cpu_start))
        wall.append(pair[1][0] / pair[0][0])
        cpu.append(pair[1][1] / pair[0][1])
    return dict(paired_wall_ratio=statistics.median(wall),
                paired_cpu_ratio=statistics.median(cpu))


def profile_step(step, top: int = 6) -> list:
    """Run ``step`` under torch.profiler; return the ``top`` operators and
    named ranges by self CPU time as (name, seconds), and the total."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total,
                    reverse=True)
    rows = [(e.key, e.self_cpu_time_total / 1e6) for e in events[:top]]
    total = sum(e.self_cpu_time_total for e in events) / 1e6
    return rows + [('total', total)]


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

    def ratio(key):
        return r[key] / fp[key] if fp else float('nan')

    init = (f'{r["init_seconds"]:.2f}/{r["init_cpu_seconds"]:.2f}'
            if 'init_seconds' in r else '-')
    return (f'{name:<22} {r["bits"]:>4} {r["variant"]:<8} '
            f'{r["step_seconds"]:>7.2f} {ratio("step_seconds"):>6.2f}x '
            f'{r["step_cpu_seconds"]:>7.2f} '
            f'{ratio("step_cpu_seconds"):>6.2f}x '
            f'{r["peak_bytes"] / 2**30:>8.2f} {ratio("peak_bytes"):>6.2f}x '
            f'{init:>11}')


def print_paired(r: dict) -> None:
    if 'paired_cpu_ratio' in r:
        print(f'    paired with FP in one process: wall '
              f'{r["paired_wall_ratio"]:.2f}x, CPU '
              f'{r["paired_cpu_ratio"]:.2f}x', flush=True)


def print_profile(r: dict) -> None:
    for name, seconds in r.get('profile_rows', []):
        print(f'    {name:<40} {seconds:>7.3f} s self CPU', flush=True)


def main():
    args = parse_args()
    if args.worker:
        print(json.dumps(run_worker(json.loads(args.worker))))
        return

    import torch

    from mmdgms.quant.functional import load_fused_kernels
    isas = load_fused_kernels().available_isas()
    threads = args.threads or torch.get_num_threads()
    print(f'torch {torch.__version__}, {threads} threads, '
          f'device {args.device}, image {args.size}x{args.size}, batch 1, '
          f'fused kernels: {isas[0]}, {args.steps} timed steps (median), '
          f'load average {os.getloadavg()[0]:.1f} at start', flush=True)
    header = (f'{"config":<22} {"bits":>4} {"variant":<8} {"step s":>7} '
              f'{"vs FP":>7} {"CPU s":>7} {"vs FP":>7} {"peak GiB":>8} '
              f'{"vs FP":>7} {"init s/CPU s":>11}')
    print(header)
    print('-' * len(header), flush=True)

    results = []
    for config in args.configs:
        fp = None
        if 'fp' in args.variants:
            fp = measure(dict(config=config, bits=32, variant='fp',
                              steps=args.steps, size=args.size,
                              device=args.device, threads=args.threads,
                              profile=args.profile, paired=args.paired))
            results.append(fp)
            print(format_row(fp, fp), flush=True)
            print_profile(fp)
            if 'error' in fp:
                fp = None
        for bits in args.bits:
            for variant in VARIANTS[1:]:
                if variant not in args.variants:
                    continue
                r = measure(dict(config=config, bits=bits, variant=variant,
                                 steps=args.steps, size=args.size,
                                 device=args.device, threads=args.threads,
                              profile=args.profile, paired=args.paired))
                results.append(r)
                print(format_row(r, fp), flush=True)
                print_paired(r)
                print_profile(r)

    print(f'load average {os.getloadavg()[0]:.1f} at end', flush=True)
    if args.out:
        partial = f'{args.out}.partial'
        with open(partial, 'w') as f:
            json.dump(results, f, indent=2)
        os.replace(partial, args.out)


if __name__ == '__main__':
    main()
