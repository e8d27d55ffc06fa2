"""Pack a DGMS-trained MMDetection detector, and load packed files back."""
import copy
import os.path as osp
import pickle
from dataclasses import dataclass
from typing import Dict, List, Optional

import torch
from mmengine.config import Config, ConfigDict
from mmengine.logging import print_log

from .config_advice import dgms_config_suggestion, trained_config_advice
from .container import write_atomic
from .detectors import attach_graphs, trace_detector
from .executor import GraphExecutor
from .reader import PackedModel, read_packed
from .writer import LayerReport, encode_packed

MIXTURE_KEY = '.mixture.'


class PackError(ValueError):
    """A config or checkpoint that cannot be packed. The message names the
    reason and what to use instead."""


@dataclass
class PackResult:
    """Output file, size reports and verification of one packing run."""
    path: Optional[str]  # None when nothing was written
    file_size: int
    reports: List[LayerReport]
    max_abs_diff: Optional[float]  # packed vs PyTorch outputs; None: skipped


def _find_dgms_hook(cfg: Config, config_path: str) -> dict:
    hooks = [
        h for h in cfg.get('custom_hooks', []) or []
        if str(h.get('type', '')).split('.')[-1] == 'DGMSHook'
    ]
    if not hooks:
        raise PackError(
            f'{config_path} has neither a DGMSDetector model nor a DGMSHook '
            'in custom_hooks, so it does not describe a DGMS model. Pass the '
            'DGMS config the checkpoint was trained with, '
            f'{dgms_config_suggestion(config_path)}')
    return copy.deepcopy(hooks[0])


def _strip_init_cfg(value):
    if isinstance(value, dict):
        return {
            k: _strip_init_cfg(v)
            for k, v in value.items() if k not in ('init_cfg', 'pretrained')
        }
    if isinstance(value, (list, tuple)):
        return [_strip_init_cfg(v) for v in value]
    return value


def build_model(cfg: Config):
    """Build the detector of ``cfg`` without loading pretrained weights."""
    from mmdet.registry import MODELS
    from mmdet.utils import register_all_modules
    register_all_modules(init_default_scope=True)
    # mmdet reads nested settings as attributes (test_cfg.score_thr), so
    # the model is built from a ConfigDict.
    model_cfg = ConfigDict(_strip_init_cfg(cfg.model.to_dict()))
    return MODELS.build(model_cfg)


def plain_model_config(model_cfg: dict) -> dict:
    """Return the full-precision detector's config: a ``DGMSDetector``
    entry becomes its ``detector_type`` without the DGMS settings, and
    ``init_cfg`` entries are removed."""
    plain = _strip_init_cfg(dict(model_cfg))
    if str(plain.get('type', '')).split('.')[-1] == 'DGMSDetector':
        plain['type'] = plain.pop('detector_type')
        plain.pop('dgms', None)
    return plain


def load_dgms_detector(config_path: str, checkpoint_path: str):
    """Build the DGMS detector of a config and load a DGMS checkpoint.

    Returns:
        (model in eval mode, Config, checkpoint meta dict)

    Raises:
        PackError: the config has no DGMSHook, the checkpoint has no
            mixtures (never DGMS-trained), or the two do not match.
    """
    import mmdgms  # noqa: F401  (registers the hook and safe loading)
    from mmengine.registry import HOOKS
    from ..convert import CONVERTED_FLAG, convert_model, dgms_layers

    for path, kind in ((config_path, 'config'), (checkpoint_path,
                                                 'checkpoint')):
        if not osp.isfile(path):
            raise FileNotFoundError(f'{kind} file not found: {path}')
    cfg = Config.fromfile(config_path)
    model = build_model(cfg)
    # A DGMSDetector model config builds the model converted; a config with
    # DGMSHook alone builds it in full precision and the hook converts it.
    if not getattr(model, CONVERTED_FLAG, False):
        hook = HOOKS.build(_find_dgms_hook(cfg, config_path))
        convert_model(model, hook.dgms_cfg)

    try:
        checkpoint = torch.load(checkpoint_path, map_location='cpu',
                                weights_only=True)
    except (RuntimeError, EOFError, IndexError, KeyError, ValueError,
            pickle.UnpicklingError) as error:
        # torch's own message for a file it cannot unpickle suggests
        # weights_only=False, which would run arbitrary code from the file.
        raise PackError(
            f'{checkpoint_path} cannot be read as a PyTorch checkpoint '
            f'({type(error).__name__}: {str(error).splitlines()[0]}). It '
            'is truncated or not a checkpoint: use the .pth file that '
            'tools/train.py wrote') from error
    state = checkpoint.get('state_dict', checkpoint) if isinstance(
        checkpoint, dict) else None
    if not isinstance(state, dict):
        raise PackError(f'{checkpoint_path} is not a checkpoint: it '
                        'contains no state_dict')
    meta = checkpoint.get('meta', {}) or {}
    if not any(MIXTURE_KEY in key for key in state):
        raise PackError(
            f'{checkpoint_path} has no Gaussian-mixture parameters: it was '
            'never trained with DGMS. Fine-tune it first with a DGMS config '
            f'(tools/train.py {config_path} --cfg-options '
            f'load_from={checkpoint_path}), then pack the checkpoint that '
            'training writes')
    state = {k[len('module.'):] if k.startswith('module.') else k: v
             for k, v in state.items()}
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    mismatched = [
        f'{k} {tuple(state[k].shape)} vs {tuple(v.shape)}'
        for k, v in expected.items()
        if k in state and tuple(state[k].shape) != tuple(v.shape)
    ]
    problems = [
        f'{len(items)} {what} (e.g. {items[:3]})'
        for items, what in ((missing, 'missing keys'),
                            (unexpected, 'unexpected keys'),
                            (mismatched, 'shape mismatches, checkpoint vs '
                             'config'))
        if items
    ]
    if problems:
        raise PackError(
            f'{checkpoint_path} does not match {config_path}: '
            f'{"; ".join(problems)}. '
            f'{trained_config_advice(checkpoint_path, config_path)}')
    model.load_state_dict(state)
    for name, layer in dgms_layers(model).items():
        if not layer.mixture.initialized:
            raise PackError(
                f'{checkpoint_path} has no trained mixture for {name} at '
                f'{layer.bits} bits: it does not match the DGMS settings of '
                f'{config_path}. '
                f'{trained_config_advice(checkpoint_path, config_path)}')
    model.eval()
    return model, cfg, meta


def _test_resize(cfg: Config) -> Optional[Dict]:
    dataloader = cfg.get('test_dataloader') or {}
    pipeline = (dataloader.get('dataset') or {}).get('pipeline') or []
    for step in pipeline:
        if str(step.get('type')).split('.')[-1] == 'Resize':
            return dict(scale=list(step.get('scale')),
                        keep_ratio=bool(step.get('keep_ratio', False)))
    return None


def _classes(cfg: Config, meta: dict) -> Optional[List[str]]:
    dataset_meta = meta.get('dataset_meta') or {}
    classes = dataset_meta.get('classes')
    if classes is None:
        dataset = (cfg.get('test_dataloader') or {}).get('dataset') or {}
        classes = (dataset.get('metainfo') or {}).get('classes')
    return list(classes) if classes is not None else None


def quantized_summary(graphs: Dict) -> Dict:
    """Return the count, weights, average bits and sparsity of the
    quantized convs of traced graphs (each shared layer once)."""
    layers = {}
    for graph in graphs.values():
        for node in graph.nodes:
            if node.op == 'conv2d' and node.params.indices is not None:
                layers[node.name] = node.params
    weights = sum(p.indices.size for p in layers.values())
    return dict(
        layers=len(layers),
        weights=int(weights),
        bits_per_weight=sum(p.bits * p.indices.size
                            for p in layers.values()) / max(weights, 1),
        sparsity=sum(int((p.indices == 0).sum())
                     for p in layers.values()) / max(weights, 1))


def describe_model(cfg: Config, meta: dict, graphs: Dict, info: Dict,
                   source: str) -> Dict:
    """Return the META object (see docs/packed-format.md)."""
    from mmdgms import __version__

    preprocessor = cfg.model.get('data_preprocessor') or {}
    model_config = plain_model_config(cfg.model.to_dict())
    return dict(
        producer=f'mmdgms {__version__}',
        source=osp.basename(source),
        detector=dict(info, type=model_config['type']),
        classes=_classes(cfg, meta),
        preprocess=dict(
            mean=list(preprocessor.get('mean', [0, 0, 0])),
            std=list(preprocessor.get('std', [1, 1, 1])),
            bgr_to_rgb=bool(preprocessor.get('bgr_to_rgb', False)),
            pad_size_divisor=int(preprocessor.get('pad_size_divisor', 1)),
            pad_value=float(preprocessor.get('pad_value', 0)),
            resize=_test_resize(cfg)),
        dgms=quantized_summary(graphs),
        model_config=model_config)


@torch.no_grad()
def compare_outputs(model, graphs, info, size: int = 256) -> float:
    """Return the largest absolute difference between the detector's head
    outputs and the packed main graph's, on a fixed pseudo-random image."""
    generator = torch.Generator().manual_seed(0)
    image = torch.randn(1, 3, size, size, generator=generator)
    packed = GraphExecutor(graphs['main'])(image)
    feats = model.neck(model.backbone(image))
    if info['kind'] == 'single_stage':
        cls_scores, bbox_preds = model.bbox_head(feats)
        reference = {f'cls_score.{i}': t for i, t in enumerate(cls_scores)}
        reference.update(
            {f'bbox_pred.{i}': t for i, t in enumerate(bbox_preds)})
    else:
        cls_scores, bbox_preds = model.rpn_head(feats)
        reference = {f'feat.{i}': t for i, t in enumerate(feats)}
        reference.update(
            {f'rpn_cls_score.{i}': t for i, t in enumerate(cls_scores)})
        reference.update(
            {f'rpn_bbox_pred.{i}': t for i, t in enumerate(bbox_preds)})
    return max(float((packed[name] - tensor).abs().max())
               for name, tensor in reference.items())


def pack_checkpoint(config_path: str,
                    checkpoint_path: str,
                    out_path: Optional[str],
                    weight_dtype: str = 'f32',
                    entropy: bool = False,
                    verify: bool = True) -> PackResult:
    """Pack a DGMS checkpoint into ``out_path`` (written atomically), or
    only measure the packed sizes when ``out_path`` is None.

    With ``verify``, the encoded bytes are parsed back before writing, and
    the packed main graph runs against the PyTorch detector on one fixed
    input. The result records the largest absolute difference.
    """
    model, cfg, meta = load_dgms_detector(config_path, checkpoint_path)
    print_log('pack: loaded the checkpoint; tracing and quantizing',
              logger='current')
    graphs, info = trace_detector(model)
    meta_obj = describe_model(cfg, meta, graphs, info, checkpoint_path)
    print_log(
        f'pack: encoding {meta_obj["dgms"]["layers"]} quantized layers '
        f'({"rANS" if entropy else "bit-packed"} indices, {weight_dtype} '
        'dense layers)', logger='current')
    data, reports = encode_packed(graphs, meta_obj, weight_dtype, entropy)

    max_diff = None
    if verify:
        print_log('pack: reading the file back and comparing with PyTorch',
                  logger='current')
        packed = read_packed(data, out_path or 'packed data')
        max_diff = compare_outputs(model, packed.graphs, info)
    if out_path is not None:
        write_atomic(out_path, data)
    return PackResult(out_path, len(data), reports, max_diff)


def build_packed_detector(packed: PackedModel):
    """Build an MMDetection detector that runs a packed model.

    The detector comes from the model config stored in the file; its
    tensors are computed by the packed graphs. Use it like any detector
    in eval mode: ``model.test_step``, a Runner's test loop, or
    ``mmdet.apis.inference_detector``.
    """
    cfg = Config(dict(model=packed.meta['model_config']))
    model = build_model(cfg)
    model.eval()
    attach_graphs(model, packed.graphs, packed.meta['detector'])
    classes = packed.meta.get('classes')
    if classes is not None:
        model.dataset_meta = dict(classes=tuple(classes))
    return model


def load_packed_detector(path: str):
    """Read ``path`` and return (detector, PackedModel)."""
    packed = read_packed(path)
    return build_packed_detector(packed), packed
