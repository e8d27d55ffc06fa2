"""Run the tree-crown demo end to end and write a summary.

Stages (each skipped when its result already exists, unless --force):
  1. prepare the DeepForest tree data (data/trees) and the ImageNet
     MobileNetV2 backbone checkpoint (checkpoints/);
  2. train the full-precision RetinaNet (MobileNetV2 + FPN);
  3. fine-tune it with DGMS at 4 bits and at 2 bits;
  4. evaluate all three on the held-out sites (COCO mAP, hard weights for
     DGMS) and write summary.json and summary.md to the work dir.

Example:
    python tools/run_demo.py --work-dir work_dirs/demo
"""
import argparse
import json
import os
import os.path as osp
import tempfile
import time
from pathlib import Path

import warning_filters  # noqa: F401  (before mmengine, mmcv and mmdet)

import torch
from mmengine.config import Config
from mmengine.logging import print_log
from mmengine.runner import Runner

import mmdgms  # noqa: F401  (registers DGMS parts and safe checkpoint loading)
from mmdgms.convert import dgms_layers
from mmdgms.data import prepare_tree_dataset
from mmdgms.pretrained import ensure_mobilenet_v2_checkpoint
from mmdgms.stats import layer_stats, total_stats

REPO_ROOT = Path(__file__).resolve().parents[1]
CONFIG_DIR = REPO_ROOT / 'configs' / 'trees'
STAGES = {
    'fp': ('retinanet_mnv2_fpn_trees_fp.py', 'full precision'),
    'dgms4': ('retinanet_mnv2_fpn_trees_dgms4.py', 'DGMS 4-bit'),
    'dgms2': ('retinanet_mnv2_fpn_trees_dgms2.py', 'DGMS 2-bit'),
}
METRIC_KEYS = ('bbox_mAP', 'bbox_mAP_50', 'bbox_mAP_75', 'bbox_mAP_s',
               'bbox_mAP_m')


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--work-dir', default='work_dirs/demo',
                        help='folder for checkpoints, logs and the summary')
    parser.add_argument('--data-root', default='data/trees',
                        help='where the prepared tree data is written')
    parser.add_argument('--pretrained',
                        default='checkpoints/mobilenet_v2_imagenet_mmdet.pth',
                        help='converted ImageNet MobileNetV2 checkpoint')
    parser.add_argument('--force', action='store_true',
                        help='train every stage again even if its '
                        'checkpoint exists')
    return parser.parse_args()


def stage_config(stage: str, data_root: str, work_dir: str,
                 load_from=None, pretrained=None) -> Config:
    cfg = Config.fromfile(str(CONFIG_DIR / STAGES[stage][0]))
    root = data_root.rstrip('/') + '/'
    for loader in ('train_dataloader', 'val_dataloader', 'test_dataloader'):
        cfg[loader].dataset.data_root = root
    for evaluator in ('val_evaluator', 'test_evaluator'):
        cfg[evaluator].ann_file = root + 'annotations/val.json'
    cfg.work_dir = work_dir
    if load_from is not None:
        cfg.load_from = load_from
    if pretrained is not None:
        cfg.model.backbone.init_cfg = dict(type='Pretrained',
                                           checkpoint=pretrained)
    return cfg


def final_checkpoint(cfg: Config) -> str:
    return osp.join(cfg.work_dir, f'epoch_{cfg.train_cfg.max_epochs}.pth')


def train_stage(stage, args, load_from=None) -> dict:
    work_dir = osp.join(args.work_dir, stage)
    pretrained = args.pretrained if stage == 'fp' else None
    cfg = stage_config(stage, args.data_root, work_dir, load_from, pretrained)
    checkpoint = final_checkpoint(cfg)
    if osp.isfile(checkpoint) and not args.force:
        print_log(f'[demo] {STAGES[stage][1]}: reusing {checkpoint}',
                  logger='current')
        return dict(checkpoint=checkpoint, train_seconds=None)

    print_log(f'[demo] {STAGES[stage][1]}: training '
              f'{cfg.train_cfg.max_epochs} epochs into {work_dir}',
              logger='current')
    start = time.perf_counter()
    Runner.from_cfg(cfg).train()
    seconds = time.perf_counter() - start
    print_log(f'[demo] {STAGES[stage][1]}: trained in {seconds / 60:.1f} min',
              logger='current')
    return dict(checkpoint=checkpoint, train_seconds=round(seconds, 1))


def evaluate_stage(stage, args, checkpoint, split='val') -> dict:
    """Return COCO metrics of a checkpoint on a split, with layer stats."""
    work_dir = osp.join(args.work_dir, stage, f'test_{split}')
    cfg = stage_config(stage, args.data_root, work_dir, load_from=checkpoint)
    cfg.model.backbone.init_cfg = None
    if split != 'val':
        root = args.data_root.rstrip('/') + '/'
        cfg.test_dataloader.dataset.ann_file = f'annotations/{split}.json'
        cfg.test_evaluator.ann_file = f'{root}annotations/{split}.json'
    runner = Runner.from_cfg(cfg)
    metrics = runner.test()
    result = {k: float(metrics[f'coco/{k}']) for k in METRIC_KEYS}

    model = runner.model.module if hasattr(runner.model,
                                           'module') else runner.model
    if dgms_layers(model):
        rows = layer_stats(model)
        result['layers'] = rows
        result['total'] = total_stats(rows)
    result['params'] = sum(p.numel() for n, p in model.named_parameters()
                           if '.mixture.' not in n)
    return result


def write_atomically(path: str, text: str) -> None:
    folder = osp.dirname(path) or '.'
    fd, tmp = tempfile.mkstemp(dir=folder, prefix='.tmp-')
    try:
        with os.fdopen(fd, 'w') as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def markdown_summary(summary: dict) -> str:
    lines = [
        '# DGMS tree-crown demo', '',
        f'Data: {summary["data"]["train_images"]} training tiles '
        f'({summary["data"]["train_boxes"]} boxes, site YELL); validation '
        f'on {summary["data"]["val_images"]} images of other sites '
        f'({summary["data"]["val_boxes"]} boxes, OSBS and SOAP).', '',
        '| model | mAP | mAP@50 | mAP@75 | quantized weights | sparsity '
        '| bits | train time |', '|---|---|---|---|---|---|---|---|'
    ]
    for stage, (_, title) in STAGES.items():
        r = summary['results'][stage]
        total = r.get('total')
        quantized = f'{total["params"] / 1e6:.2f} M' if total else '-'
        sparsity = f'{total["sparsity"]:.3f}' if total else '-'
        bits = f'{total["bits"]:.1f}' if total else '32 (float)'
        seconds = r.get('train_seconds')
        train = f'{seconds / 60:.1f} min' if seconds else '(reused)'
        lines.append(
            f'| {title} | {100 * r["bbox_mAP"]:.1f} | '
            f'{100 * r["bbox_mAP_50"]:.1f} | {100 * r["bbox_mAP_75"]:.1f} '
            f'| {quantized} | {sparsity} | {bits} | {train} |')
    delta = 100 * (summary['results']['dgms4']['bbox_mAP'] -
                   summary['results']['fp']['bbox_mAP'])
    lines += ['', f'4-bit minus full precision: {delta:+.1f} mAP points.', '']
    lines += [
        'In-domain reference (the training tiles, site YELL):', '',
        '| model | mAP | mAP@50 | mAP@75 |', '|---|---|---|---|'
    ]
    for stage, (_, title) in STAGES.items():
        r = summary['results'][stage]['train_split']
        lines.append(f'| {title} | {100 * r["bbox_mAP"]:.1f} | '
                     f'{100 * r["bbox_mAP_50"]:.1f} | '
                     f'{100 * r["bbox_mAP_75"]:.1f} |')
    lines.append('')

    for stage in ('dgms4', 'dgms2'):
        r = summary['results'][stage]
        lines += [
            f'## Per-layer table, {STAGES[stage][1]}', '',
            '| layer | bits | weights | sparsity | used codes | codebook '
            'range |', '|---|---|---|---|---|---|'
        ]
        for row in r['layers']:
            lines.append(
                f'| {row["name"]} | {row["bits"]} | {row["params"]} | '
                f'{row["sparsity"]:.3f} | {row["used_components"]} | '
                f'[{row["codebook_min"]:+.4f}, {row["codebook_max"]:+.4f}] |')
        lines.append('')
    return '\n'.join(lines)


def main():
    args = parse_args()
    os.makedirs(args.work_dir, exist_ok=True)
    start = time.perf_counter()

    print_log('[demo] stage 1/4: data and ImageNet backbone', logger='current')
    data = prepare_tree_dataset(args.data_root)
    ensure_mobilenet_v2_checkpoint(args.pretrained)

    print_log('[demo] stage 2/4: full-precision training', logger='current')
    runs = {'fp': train_stage('fp', args)}
    print_log('[demo] stage 3/4: DGMS fine-tuning at 4 and 2 bits',
              logger='current')
    for stage in ('dgms4', 'dgms2'):
        runs[stage] = train_stage(stage, args,
                                  load_from=runs['fp']['checkpoint'])

    print_log('[demo] stage 4/4: evaluation on the held-out sites',
              logger='current')
    results = {}
    for stage, run in runs.items():
        results[stage] = evaluate_stage(stage, args, run['checkpoint'])
        results[stage].update(run)
        # In-domain reference: the training tiles themselves.
        train_metrics = evaluate_stage(stage, args, run['checkpoint'],
                                       split='train')
        results[stage]['train_split'] = {
            k: train_metrics[k]
            for k in METRIC_KEYS
        }

    splits = data['splits']
    summary = dict(
        data=dict(train_images=splits['train']['images'],
                  train_boxes=splits['train']['boxes'],
                  val_images=splits['val']['images'],
                  val_boxes=splits['val']['boxes']),
        results=results,
        torch=torch.__version__,
        total_seconds=round(time.perf_counter() - start, 1))
    json_path = osp.join(args.work_dir, 'summary.json')
    md_path = osp.join(args.work_dir, 'summary.md')
    write_atomically(json_path, json.dumps(summary, indent=2))
    write_atomically(md_path, markdown_summary(summary))
    print_log(
        f'[demo] done in {summary["total_seconds"] / 60:.1f} min: '
        f'{md_path} and {json_path}', logger='current')
    for stage, (_, title) in STAGES.items():
        print_log(f'[demo] {title}: mAP {100 * results[stage]["bbox_mAP"]:.1f}',
                  logger='current')


if __name__ == '__main__':
    main()
