"""End-to-end detector latency: the C++ runtime against PyTorch and ONNX
Runtime, all FP32 arithmetic, same input, same thread count.

For each model the DGMS detector is traced and packed in memory (f32,
bit-packed indices), then timed three ways on one random input:

- ``runtime``: the C++ runtime through ctypes (graph + post-processing);
- ``pytorch``: the packed graph with decoded FP32 weights in PyTorch plus
  MMDetection's post-processing (``detector.predict``);
- ``onnxruntime``: the same graph exported to ONNX (FP32), graph only:
  post-processing is not included, which favours ONNX Runtime. Each
  layer's folded BatchNorm scale is multiplied into its decoded weights
  before the export, so the ONNX graph has plain Conv nodes with a bias,
  as an exported MMDetection model has after ONNX Runtime folds its
  BatchNorm nodes. (Exported as the executor computes it, a Conv followed
  by a Mul and an Add, the demo detector ran about 25 % slower in ONNX
  Runtime 1.31.1.)

Models: ``demo4`` / ``demo2`` (the demo's checkpoints under
work_dirs/demo, run tools/run_demo.py first) and ``r50-4`` / ``r50-2``
(RetinaNet-R50 from configs/dgms/retinanet_r50_4bit.py with random
weights and k-means-initialised mixtures; speed does not depend on
training).

Example:
    python tools/benchmark_runtime.py --models demo4 r50-4 r50-2 \\
        --threads 2 --size 512 512
"""
import argparse
import os
import statistics
import sys
import tempfile
import time

import warning_filters  # noqa: F401  (before mmengine, mmcv and mmdet)

import numpy as np
import torch
from mmengine.logging import print_log

from benchmark_pack import DEMO, REPO_ROOT, random_r50
from mmdgms.deploy_arm import RuntimeDetector
from mmdgms.pack import build_packed_detector, load_dgms_detector, read_packed
from mmdgms.pack.detectors import trace_detector
from mmdgms.pack.executor import GraphExecutor
from mmdgms.pack.packer import describe_model
from mmdgms.pack.writer import encode_packed


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--models', nargs='+', default=['demo4', 'r50-4'],
                        choices=['demo4', 'demo2', 'r50-4', 'r50-2'],
                        help='models to time (default: demo4 r50-4); the '
                        'demo ones need tools/run_demo.py first')
    parser.add_argument('--threads', type=int, default=1,
                        help='threads of all three runtimes (default: 1)')
    parser.add_argument('--size', type=int, nargs=2, default=None,
                        metavar=('H', 'W'),
                        help='input height and width (default: 416 416 for '
                        'the demo, 512 512 for R50)')
    parser.add_argument('--repeat', type=int, default=5,
                        help='rounds per model, each running every runtime '
                        'once untimed and --per-round times timed; the '
                        'median of all timed runs is reported (default: 5)')
    parser.add_argument('--per-round', type=int, default=3,
                        help='timed runs of each runtime per round '
                        '(default: 3)')
    parser.add_argument('--demo-root', default=REPO_ROOT,
                        help='checkout holding work_dirs/demo (default: '
                        'this one)')
    parser.add_argument('--skip', nargs='*', default=[],
                        choices=['runtime', 'pytorch', 'onnxruntime'])
    args = parser.parse_args(argv)
    for option, value in (('--repeat', args.repeat),
                          ('--per-round', args.per_round)):
        if value < 1:
            parser.error(f'{option} is {value}, expected at least 1')
    return args


def packed_bytes(name: str, demo_root: str) -> bytes:
    if name.startswith('r50'):
        bits = int(name.split('-')[1])
        model, cfg = random_r50(bits)
        meta = dict(dataset_meta=dict(classes=None))
    else:
        config, checkpoint = DEMO[name]
        if not os.path.isfile(os.path.join(demo_root, checkpoint)):
            raise SystemExit(
                f'{name}: checkpoint {os.path.join(demo_root, checkpoint)} '
                'not found. Train the demo with tools/run_demo.py, or pass '
                '--demo-root with the checkout that holds work_dirs/demo')
        model, cfg, meta = load_dgms_detector(
            os.path.join(demo_root, config),
            os.path.join(demo_root, checkpoint))
    graphs, info = trace_detector(model)
    data, _ = encode_packed(graphs, describe_model(cfg, meta, graphs, info,
                                                   name), 'f32', False)
    return data


def fold_scales(executor: GraphExecutor) -> GraphExecutor:
    """Multiply each conv's per-channel scale into its weights and drop
    the scale, so that the conv runs as conv2d(x, weight, bias)."""
    for name, scale in list(executor.named_buffers()):
        if not name.endswith('_scale') or scale is None:
            continue
        key = name[:-len('_scale')]
        weight = getattr(executor, f'{key}_weight')
        setattr(executor, f'{key}_weight', weight * scale.view(-1, 1, 1, 1))
        setattr(executor, name, None)
    return executor


def bench_model(name, args) -> dict:
    size = args.size or ((416, 416) if name.startswith('demo') else
                         (512, 512))
    print_log(f'{name}: packing', logger='current')
    data = packed_bytes(name, args.demo_root)
    torch.manual_seed(0)
    image = torch.randn(1, 3, *size)
    img_shape, scale = size, (1.0, 1.0)
    result = dict(model=name, size=f'{size[0]}x{size[1]}',
                  mb=len(data) / 2**20)
    runs = {}  # name -> callable running one inference
    if 'runtime' not in args.skip:
        print_log(f'{name}: runtime', logger='current')
        runtime = RuntimeDetector(data, threads=args.threads)
        array = image[0].numpy()
        runs['runtime'] = lambda: runtime.detect(array, img_shape, scale)
    packed = read_packed(data)
    if 'pytorch' not in args.skip:
        print_log(f'{name}: pytorch', logger='current')
        from mmdet.structures import DetDataSample
        detector = build_packed_detector(packed)
        sample = DetDataSample(metainfo=dict(img_shape=img_shape,
                                             scale_factor=scale,
                                             ori_shape=img_shape))

        def run_pytorch():
            with torch.no_grad():
                detector.predict(image, [sample.clone()])

        runs['pytorch'] = run_pytorch
    if 'onnxruntime' not in args.skip:
        print_log(f'{name}: onnxruntime', logger='current')
        import onnxruntime as ort
        executor = fold_scales(GraphExecutor(packed.graphs['main']).eval())
        names = [n for n, _ in packed.graphs['main'].outputs]

        class AsTuple(torch.nn.Module):

            def __init__(self):
                super().__init__()
                self.executor = executor

            def forward(self, x):
                out = self.executor(x)
                return tuple(out[n] for n in names)

        with tempfile.TemporaryDirectory() as folder:
            path = os.path.join(folder, 'model.onnx')
            torch.onnx.export(AsTuple().eval(), (image, ), path,
                              input_names=['image'], output_names=names,
                              opset_version=17, dynamo=False)
            options = ort.SessionOptions()
            options.intra_op_num_threads = args.threads
            options.inter_op_num_threads = 1
            session = ort.InferenceSession(
                path, options, providers=['CPUExecutionProvider'])
        feed = dict(image=image.numpy())
        runs['onnxruntime'] = lambda: session.run(None, feed)
    # Rounds in which every runtime runs once untimed and then `per_round`
    # times timed: on a shared machine the speed drifts over seconds, and
    # all runs of one runtime after another would give that drift to one
    # of them. The untimed run takes what the previous runtime leaves
    # behind: a cache full of its data and, with 2 threads, ONNX Runtime's
    # threads still spinning for a while after its run.
    print_log(f'{name}: timing {args.repeat} rounds', logger='current')
    times = {key: [] for key in runs}
    for _ in range(args.repeat):
        for key, run in runs.items():
            run()
            for _ in range(args.per_round):
                start = time.perf_counter()
                run()
                times[key].append(time.perf_counter() - start)
    for key, values in times.items():
        result[key] = statistics.median(values) * 1000
    return result


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = [bench_model(name, args) for name in args.models]
    print(f'threads {args.threads}, median of {args.repeat} rounds x '
          f'{args.per_round} runs, ms')
    print(f'{"model":<8} {"input":>9} {"file MiB":>8} {"runtime":>9} '
          f'{"pytorch":>9} {"onnxrt*":>9}')
    for row in rows:
        cells = [f'{row[k]:9.1f}' if k in row else f'{"-":>9}'
                 for k in ('runtime', 'pytorch', 'onnxruntime')]
        print(f'{row["model"]:<8} {row["size"]:>9} {row["mb"]:8.2f} '
              + ' '.join(cells))
    print('* ONNX Runtime: graph only, without post-processing')
    return 0


if __name__ == '__main__':
    sys.exit(main())
