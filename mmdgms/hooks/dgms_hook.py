"""MMEngine hook that runs DGMS quantization-aware fine-tuning."""
import copy
import os.path as osp
import time
from typing import Dict, Optional, Sequence

from mmengine.dist import broadcast, get_world_size
from mmengine.hooks import Hook, LoggerHook
from mmengine.logging import print_log
from mmengine.model import is_model_wrapper
from mmengine.optim import BaseOptimWrapper
from mmengine.registry import HOOKS
from mmengine.runner import BaseLoop
from torch.nn.parallel import DistributedDataParallel

from ..convert import (CONVERSION_CONFIG_ATTR, CONVERTED_FLAG,
                       DEFAULT_INCLUDE, DGMSConfig, convert_model,
                       dgms_layers)
from ..ops import set_hard_weight_cache
from ..stats import bit_width_stats, format_table, layer_stats, total_stats

CHECKPOINT_META_KEY = 'dgms'

# Scalar names. Totals go through the message hub as
# '<mode>/<group>/<name>', which LoggerHook logs as '<group>/<name>'.
# Training totals use their own group because LoggerHook steps them by
# iteration, and evaluation totals by epoch (or iteration).
TRAIN_SCALAR_GROUP = 'dgms'
EVAL_SCALAR_GROUP = 'dgms_eval'
LAYER_SCALAR_GROUP = 'dgms_layers'
# scalar name -> key of mmdgms.stats.total_stats
TOTAL_SCALARS = dict(sparsity='sparsity',
                     avg_bits='bits',
                     temperature='temperature',
                     codebook_usage='codebook_usage')
LAYER_SCALARS = ('sparsity', 'temperature', 'codebook_usage')


@HOOKS.register_module()
class DGMSHook(Hook):
    """Quantize a detector's conv layers with DGMS from the config alone.

    What happens at each runner stage:

    - ``before_run``: the selected conv layers (by default every conv of the
      backbone and the neck except the stem) become
      :class:`~mmdgms.ops.DGMSConv2d`, keeping their weight and bias
      Parameters. A model built by ``DGMSDetector`` arrives converted: the
      hook then only checks that its settings equal the model's. When
      training, the optimizer wrapper and parameter
      schedulers are built again from the config so that they include the
      mixture parameters (``paramwise_cfg`` applies to them as to any other
      parameter: their names contain ``.mixture.``). A distributed model
      wrapper is rebuilt around the converted model, so that it also
      synchronises the mixture gradients.
    - ``before_train`` (after ``load_from`` or ``resume``): every mixture
      that the loaded checkpoint did not provide is initialised by k-means
      from the loaded full-precision weights, and in distributed training
      every rank then copies rank 0's mixtures. A resumed run restores its
      mixtures from the checkpoint and initialises nothing.
    - training iterations use soft weights; validation and testing use hard
      (codebook) weights, computed once per evaluation.
    - every ``stats_interval`` training iterations the hook puts four
      totals into the message hub: ``dgms/sparsity``, ``dgms/avg_bits``
      (bits per weight, weighted by the layers' number of weights),
      ``dgms/temperature`` (mean over layers) and ``dgms/codebook_usage``
      (fraction of components holding a weight). LoggerHook writes them to
      the text log and to every backend of the visualizer's
      ``vis_backends`` (e.g. TensorBoard). After each evaluation the same
      totals go out as ``dgms_eval/*`` (at test time LoggerHook writes them
      to the text log and the test JSON only). After the k-means
      initialisation and each evaluation, each layer's sparsity,
      temperature and codebook usage go to the visualizer backends (not
      the text log) as ``dgms_layers/<layer>/<name>``. Unless
      ``log_layer_table`` is False, the per-layer table is also logged as
      text.
    - ``before_save_checkpoint``: stores the per-layer bit widths, the
      number of quantized weights, the average bits per weight and the
      total sparsity under ``checkpoint['meta']['dgms']``.

    Args:
        bits (int): bits per weight, 1 to 8. Default: 4.
        include (Sequence[str]): module-name patterns (fnmatch) of the conv
            layers to quantize. Default: ``('backbone.*', 'neck.*')``.
        exclude (Sequence[str]): patterns to keep in full precision.
            Default: ().
        skip_stem (bool): keep the backbone's first conv in full precision.
            Default: True.
        layer_bits (dict, optional): module-name pattern -> bits for
            mixed precision. The first pattern (in the order written) that
            matches a layer sets its bits; see
            :class:`~mmdgms.convert.DGMSConfig`. Default: None.
        init_temperature (float): starting temperature. Default: 0.01.
        learn_temperature (bool): train the temperature. Default: True.
        min_std (float): lower bound on standard deviations. Default: 1e-6.
        min_temperature (float): lower bound on the temperature.
            Default: 1e-4.
        require_pretrained (bool): refuse to train when neither ``load_from``
            nor ``resume`` provides weights, because DGMS initialises the
            mixtures from trained weights. Default: True.
        stats_interval (int, optional): iterations between sparsity logs;
            None uses the LoggerHook interval. Default: None.
        log_layer_table (bool): log the per-layer table after every
            evaluation. Default: True.

    Note:
        MMEngine builds the optimizer before ``before_run`` and loads
        checkpoints after it, so the hook must run from a runner built from
        a config (``Runner.from_cfg`` or ``tools/train.py``): the optimizer
        and schedulers are rebuilt from ``runner.cfg``.
    """

    priority = 'VERY_HIGH'

    def __init__(self,
                 bits: int = 4,
                 include: Sequence[str] = DEFAULT_INCLUDE,
                 exclude: Sequence[str] = (),
                 skip_stem: bool = True,
                 layer_bits: Optional[Dict[str, int]] = None,
                 init_temperature: float = 0.01,
                 learn_temperature: bool = True,
                 min_std: float = 1e-6,
                 min_temperature: float = 1e-4,
                 require_pretrained: bool = True,
                 stats_interval: Optional[int] = None,
                 log_layer_table: bool = True):
        self.dgms_cfg = DGMSConfig(
            bits=bits,
            include=include,
            exclude=exclude,
            skip_stem=skip_stem,
            layer_bits=layer_bits or {},
            init_temperature=init_temperature,
            learn_temperature=learn_temperature,
            min_std=min_std,
            min_temperature=min_temperature)
        if stats_interval is not None and (not isinstance(stats_interval, int)
                                           or stats_interval < 1):
            raise ValueError('stats_interval must be a positive integer or '
                             f'None, got {stats_interval!r}')
        self.require_pretrained = require_pretrained
        self.stats_interval = stats_interval
        self.log_layer_table = log_layer_table

    # ------------------------------------------------------------------
    # conversion
    # ------------------------------------------------------------------
    @staticmethod
    def _unwrap(runner):
        model = runner.model
        return model.module if is_model_wrapper(model) else model

    @staticmethod
    def _is_training(runner) -> bool:
        return isinstance(runner._train_loop, BaseLoop) and isinstance(
            runner.optim_wrapper, BaseOptimWrapper)

    def before_run(self, runner) -> None:
        training = self._is_training(runner)
        self._check_checkpoint_source(runner, training)

        model = self._unwrap(runner)
        if not getattr(model, CONVERTED_FLAG, False):
            self._convert(runner, model)
        else:
            self._check_built_conversion(model)
        if training:
            self._rebuild_optimizer(runner)

    def _convert(self, runner, model) -> None:
        convert_model(model, self.dgms_cfg)
        setattr(model, CONVERTED_FLAG, True)
        widths = bit_width_stats(model)
        per_width = ', '.join(
            f'{bits} bits: {count}'
            for bits, count in widths['layers_per_bits'].items())
        print_log(
            f'DGMS: quantizing {widths["layers"]} conv layers '
            f'({widths["params"] / 1e6:.2f} M weights) at '
            f'{widths["avg_bits"]:.3f} bits per weight on average '
            f'(layers per bit width: {per_width})', logger='current')

        if is_model_wrapper(runner.model):
            self._wrap_again(runner, model)

    @staticmethod
    def _wrap_again(runner, model) -> None:
        # The runner's wrapper registered its gradient hooks for the
        # parameters it saw, so the mixture parameters need a new wrapper.
        # The old reducer keeps its hooks on the weights that the DGMS layers
        # took over until the old wrapper is garbage-collected. Removing them
        # now means that no leftover reference to the old wrapper can make a
        # backward pass start its all-reduce as well.
        old = runner.model
        if isinstance(old, DistributedDataParallel):
            old._remove_autograd_hooks()
        runner.model = runner.wrap_model(
            copy.deepcopy(runner.cfg.get('model_wrapper_cfg')), model)

    def _check_built_conversion(self, model) -> None:
        # A model built by DGMSDetector arrives converted, so the hook's own
        # conversion settings must agree with the ones it was built with.
        built_with = getattr(model, CONVERSION_CONFIG_ATTR, None)
        if built_with is None or built_with == self.dgms_cfg:
            return
        differences = ', '.join(
            f'{name}: model {ours!r}, hook {theirs!r}'
            for name, (ours, theirs) in built_with.differences(
                self.dgms_cfg).items())
        raise ValueError(
            'the model was built by DGMSDetector with other DGMS settings '
            f'than DGMSHook has ({differences}). Give both the same '
            "settings, e.g. dgms = dict(bits=4), model = dict(type="
            "'DGMSDetector', ..., dgms=dgms) and custom_hooks = "
            "[dict(type='DGMSHook', **dgms)]")

    def _rebuild_optimizer(self, runner) -> None:
        optim_cfg = runner.cfg.get('optim_wrapper')
        if optim_cfg is None:
            raise RuntimeError(
                'DGMSHook must add the mixture parameters to the optimizer, '
                'but runner.cfg has no optim_wrapper. Build the runner with '
                'Runner.from_cfg(cfg) (as tools/train.py does) so the '
                'optimizer can be rebuilt from its config')
        runner.optim_wrapper = runner.build_optim_wrapper(
            copy.deepcopy(optim_cfg))
        scheduler_cfg = runner.cfg.get('param_scheduler')
        runner.param_schedulers = copy.deepcopy(scheduler_cfg)
        runner.scale_lr(runner.optim_wrapper, runner.auto_scale_lr)
        if scheduler_cfg is not None:
            runner.param_schedulers = runner.build_param_scheduler(
                runner.param_schedulers)

    def _check_checkpoint_source(self, runner, training: bool) -> None:
        load_from = runner._load_from
        if load_from and '://' not in str(load_from) and not osp.exists(
                load_from):
            what = ('the full-precision checkpoint to fine-tune' if training
                    else 'the checkpoint to evaluate')
            raise FileNotFoundError(
                f'load_from={load_from!r} does not exist. It must be {what}: '
                'train or download it first (the comment next to load_from '
                'in the config says where it comes from), or pass the right '
                'path with --cfg-options load_from=PATH')
        if (training and self.require_pretrained and not load_from
                and not runner._resume):
            raise ValueError(
                'DGMS fine-tunes a trained detector and initialises its '
                'mixtures from the trained weights, but load_from is not set '
                'and resume is False. Set load_from to a full-precision '
                'checkpoint, or DGMSHook(require_pretrained=False) to '
                'quantize the freshly initialised weights')

    # ------------------------------------------------------------------
    # mixture initialisation
    # ------------------------------------------------------------------
    def before_train(self, runner) -> None:
        layers = dgms_layers(self._unwrap(runner))
        pending = {n: m for n, m in layers.items() if not m.mixture.initialized}
        if not pending:
            print_log(
                f'DGMS: all {len(layers)} mixtures come from the checkpoint; '
                'nothing to initialise', logger='current')
            return

        loaded = runner._has_loaded
        if self.require_pretrained and not loaded:
            # resume=True without load_from in a work dir that has no
            # checkpoint: MMEngine logs it and trains from scratch.
            raise ValueError(
                'no checkpoint was loaded: resume found no checkpoint in '
                f'work_dir={runner.work_dir!r} and load_from is not set, so '
                'DGMS would quantize untrained weights. Resume from a work '
                'dir that has a checkpoint, set load_from to a '
                'full-precision checkpoint, or set '
                'DGMSHook(require_pretrained=False)')

        start = time.perf_counter()
        for layer in pending.values():
            layer.mixture.init_from_weights(layer.weight)
        elapsed = time.perf_counter() - start
        source = 'the loaded weights' if loaded else 'the initial weights'
        print_log(
            f'DGMS: initialised {len(pending)} of {len(layers)} mixtures by '
            f'k-means from {source} in {elapsed:.2f} s',
            logger='current')
        self._broadcast_mixtures(runner)
        self._log_layers(runner, 'after initialisation', mode=None)

        frozen = [n for n, m in layers.items() if not m.weight.requires_grad]
        if frozen:
            print_log(
                f'DGMS: {len(frozen)} quantized layers have frozen weights '
                f'(e.g. {frozen[0]}); frozen stages run in eval mode and '
                'therefore with hard weights, so their mixtures are not '
                'trained. Set the backbone\'s frozen_stages lower or exclude '
                'those layers', logger='current', level=30)

    def _broadcast_mixtures(self, runner) -> None:
        # k-means on the same loaded weights gives the same mixtures on every
        # rank, but the DDP wrapper synchronises only gradients after its
        # construction, and no buffers. Copying rank 0's mixtures makes every
        # rank start from the same state whatever it loaded.
        if get_world_size() < 2:
            return
        for layer in dgms_layers(self._unwrap(runner)).values():
            for tensor in layer.mixture.state_dict().values():
                broadcast(tensor, src=0)

    def _check_initialized(self, runner) -> None:
        missing = [
            n for n, m in dgms_layers(self._unwrap(runner)).items()
            if not m.mixture.initialized
        ]
        if missing:
            raise RuntimeError(
                f'{len(missing)} DGMS layers (e.g. {missing[0]}) have no '
                f'mixture state after loading load_from='
                f'{runner._load_from!r}: it is not a checkpoint of a DGMS '
                'run with this config. A full-precision checkpoint is '
                'evaluated with the config it was trained with, or '
                'fine-tuned with this config first. A DGMS checkpoint with '
                'other bit widths (see the size-mismatch warnings above and '
                "checkpoint['meta']['dgms']) needs the config it was "
                'trained with')

    def before_val(self, runner) -> None:
        self._check_initialized(runner)

    def before_test(self, runner) -> None:
        self._check_initialized(runner)

    # Hard weights are computed once per evaluation: at the first forward
    # after these calls, so weights swapped in by lower-priority hooks
    # (EMAHook) are the ones quantized.
    def before_val_epoch(self, runner) -> None:
        set_hard_weight_cache(self._unwrap(runner), True)

    def before_test_epoch(self, runner) -> None:
        set_hard_weight_cache(self._unwrap(runner), True)

    # ------------------------------------------------------------------
    # logging
    # ------------------------------------------------------------------
    def _interval(self, runner) -> int:
        if self.stats_interval is not None:
            return self.stats_interval
        for hook in runner.hooks:
            if isinstance(hook, LoggerHook):
                return hook.interval
        return 50

    def _log_layers(self, runner, when: str, mode: Optional[str]) -> None:
        rows = layer_stats(self._unwrap(runner))
        if mode is not None:
            self._update_totals(runner, f'{mode}/{EVAL_SCALAR_GROUP}', rows)
        self._add_layer_scalars(runner, rows)
        if self.log_layer_table:
            print_log(f'DGMS layers {when}:\n{format_table(rows)}',
                      logger='current')

    @staticmethod
    def _update_totals(runner, prefix: str, rows: list) -> None:
        # LoggerHook takes these from the message hub into the text log and,
        # when training or validating, into every visualizer backend.
        if not rows:
            return
        total = total_stats(rows)
        for key, stat in TOTAL_SCALARS.items():
            runner.message_hub.update_scalar(f'{prefix}/{key}', total[stat])

    def _add_layer_scalars(self, runner, rows: list) -> None:
        # Per-layer values go to the visualizer backends only: one text log
        # line holds every message hub scalar, and hundreds would drown it.
        scalars = {
            f'{LAYER_SCALAR_GROUP}/{row["name"]}/{key}': row[key]
            for row in rows for key in LAYER_SCALARS
        }
        if scalars:
            runner.visualizer.add_scalars(scalars,
                                          step=self._evaluation_step(runner))

    @staticmethod
    def _evaluation_step(runner) -> int:
        # The step that LoggerHook gives the evaluation metrics, so that the
        # per-layer curves share the x axis of the mAP curves.
        if isinstance(runner._train_loop, dict) or runner._train_loop is None:
            return 0
        by_epoch = any(
            isinstance(hook, LoggerHook) and hook.log_metric_by_epoch
            for hook in runner.hooks)
        return runner.epoch if by_epoch else runner.iter

    def after_train_iter(self, runner, batch_idx, data_batch=None,
                         outputs=None) -> None:
        if not self.every_n_train_iters(runner, self._interval(runner)):
            return
        rows = layer_stats(self._unwrap(runner))
        self._update_totals(runner, f'train/{TRAIN_SCALAR_GROUP}', rows)

    def after_val_epoch(self, runner, metrics=None) -> None:
        set_hard_weight_cache(self._unwrap(runner), False)
        self._log_layers(runner, 'at validation (hard weights)', mode='val')

    def after_test_epoch(self, runner, metrics=None) -> None:
        set_hard_weight_cache(self._unwrap(runner), False)
        self._log_layers(runner, 'at test (hard weights)', mode='test')

    # ------------------------------------------------------------------
    # checkpoints
    # ------------------------------------------------------------------
    def before_save_checkpoint(self, runner, checkpoint: dict) -> None:
        model = self._unwrap(runner)
        layers = dgms_layers(model)
        widths = bit_width_stats(model)
        meta = dict(format_version=1,
                    layers={name: m.bits for name, m in layers.items()},
                    params=widths['params'],
                    avg_bits=widths['avg_bits'])
        rows = layer_stats(model)
        if len(rows) == len(layers):
            meta['sparsity'] = total_stats(rows)['sparsity']
        checkpoint.setdefault('meta', {})[CHECKPOINT_META_KEY] = meta
