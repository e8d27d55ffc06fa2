"""MMEngine hook that runs DGMS quantization-aware fine-tuning."""
import copy
import os.path as osp
import time
from typing import Dict, Optional, Sequence

from mmengine.hooks import Hook, LoggerHook
from mmengine.logging import print_log
from mmengine.model import is_model_wrapper
from mmengine.optim import BaseOptimWrapper
from mmengine.registry import HOOKS
from mmengine.runner import BaseLoop

from ..convert import (CONVERSION_CONFIG_ATTR, CONVERTED_FLAG,
                       DEFAULT_INCLUDE, DGMSConfig, convert_model,
                       dgms_layers)
from ..stats import format_table, layer_stats, total_stats

CHECKPOINT_META_KEY = 'dgms'


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
      parameter: their names contain ``.mixture.``), and a distributed model
      wrapper is rebuilt around the converted model.
    - ``before_train`` (after ``load_from`` or ``resume``): every mixture
      that the loaded checkpoint did not provide is initialised by k-means
      from the loaded full-precision weights. A resumed run restores its
      mixtures from the checkpoint and initialises nothing.
    - training iterations use soft weights; validation and testing use hard
      (codebook) weights, computed once per evaluation.
    - every ``stats_interval`` training iterations the hook logs the total
      sparsity (``dgms_sparsity``). After each evaluation it logs the total
      sparsity and bits (``dgms_sparsity``, ``dgms_bits``) and, unless
      ``log_layer_table`` is False, the per-layer table.
    - ``before_save_checkpoint``: stores the per-layer bit widths under
      ``checkpoint['meta']['dgms']``.

    Args:
        bits (int): bits per weight, 1 to 8. Default: 4.
        include (Sequence[str]): module-name patterns (fnmatch) of the conv
            layers to quantize. Default: ``('backbone.*', 'neck.*')``.
        exclude (Sequence[str]): patterns to keep in full precision.
            Default: ().
        skip_stem (bool): keep the backbone's first conv in full precision.
            Default: True.
        layer_bits (dict, optional): pattern -> bits overrides.
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
        layers = convert_model(model, self.dgms_cfg)
        setattr(model, CONVERTED_FLAG, True)
        num_weights = sum(layer.weight.numel() for layer in layers.values())
        print_log(
            f'DGMS: quantizing {len(layers)} conv layers '
            f'({num_weights / 1e6:.2f} M weights) at '
            f'{self.dgms_cfg.bits} bits', logger='current')

        if is_model_wrapper(runner.model):
            # The wrapper registered its gradient hooks for the parameters it
            # saw; wrap again so the mixture parameters are synchronised too.
            runner.model = runner.wrap_model(
                runner.cfg.get('model_wrapper_cfg'), model)

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
        self._log_layers(runner, 'after initialisation', to_hub=None)

        frozen = [n for n, m in layers.items() if not m.weight.requires_grad]
        if frozen:
            print_log(
                f'DGMS: {len(frozen)} quantized layers have frozen weights '
                f'(e.g. {frozen[0]}); frozen stages run in eval mode and '
                'therefore with hard weights, so their mixtures are not '
                'trained. Set the backbone\'s frozen_stages lower or exclude '
                'those layers', logger='current', level=30)

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

    def _log_layers(self, runner, when: str, to_hub: Optional[str]) -> dict:
        rows = layer_stats(self._unwrap(runner))
        total = total_stats(rows)
        if to_hub is not None:
            runner.message_hub.update_scalar(f'{to_hub}/dgms_sparsity',
                                             total['sparsity'])
            runner.message_hub.update_scalar(f'{to_hub}/dgms_bits',
                                             total['bits'])
        if self.log_layer_table:
            print_log(f'DGMS layers {when}:\n{format_table(rows)}',
                      logger='current')
        return total

    def after_train_iter(self, runner, batch_idx, data_batch=None,
                         outputs=None) -> None:
        if not self.every_n_train_iters(runner, self._interval(runner)):
            return
        total = total_stats(layer_stats(self._unwrap(runner)))
        runner.message_hub.update_scalar('train/dgms_sparsity',
                                         total['sparsity'])

    def after_val_epoch(self, runner, metrics=None) -> None:
        self._log_layers(runner, 'at validation (hard weights)', to_hub='val')

    def after_test_epoch(self, runner, metrics=None) -> None:
        self._log_layers(runner, 'at test (hard weights)', to_hub='test')

    # ------------------------------------------------------------------
    # checkpoints
    # ------------------------------------------------------------------
    def before_save_checkpoint(self, runner, checkpoint: dict) -> None:
        layers = dgms_layers(self._unwrap(runner))
        checkpoint.setdefault('meta', {})[CHECKPOINT_META_KEY] = dict(
            format_version=1,
            layers={name: m.bits for name, m in layers.items()})
