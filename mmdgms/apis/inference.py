"""MMDetection's init_detector with a check that config and checkpoint fit."""
from pathlib import Path
from typing import Optional, Union

from mmengine.config import Config
from torch import nn

from .checkpoint_match import check_checkpoint_matches, read_checkpoint_summary


def load_config(config: Union[str, Path, Config]) -> Config:
    """Return ``config`` as a Config, reading it when it is a path."""
    if isinstance(config, Config):
        return config
    if not Path(config).is_file():
        raise FileNotFoundError(f'config file not found: {config}')
    return Config.fromfile(str(config))


def init_detector(config: Union[str, Path, Config],
                  checkpoint: str,
                  palette: str = 'none',
                  device: str = 'cuda:0',
                  cfg_options: Optional[dict] = None) -> nn.Module:
    """Build a detector from a config, load a checkpoint and check the pair.

    The same as ``mmdet.apis.init_detector`` (which this calls), and in
    addition it raises when a DGMS checkpoint comes with a config that
    builds a full-precision model, or the other way round. mmdet's function
    works on a DGMS config by itself, because ``DGMSDetector`` converts the
    model when it is built. Without this check, though, a DGMS checkpoint
    in a full-precision config runs the latent full-precision weights after
    a mere warning.

    Args:
        config (str | Path | Config): the detector config.
        checkpoint (str): the checkpoint file.
        palette (str): as for ``mmdet.apis.init_detector``. Default: 'none'.
        device (str): device to put the model on. Default: 'cuda:0'.
        cfg_options (dict, optional): config overrides.

    Returns:
        nn.Module: the detector in eval mode, with hard weights.

    Raises:
        CheckpointMismatchError: the checkpoint does not fit the config.
    """
    from mmdet.apis import init_detector as mmdet_init_detector

    cfg = load_config(config)
    label = str(config) if not isinstance(config, Config) else (
        cfg.filename or 'the given Config')
    summary = read_checkpoint_summary(checkpoint)
    model = mmdet_init_detector(cfg, checkpoint, palette=palette,
                                device=device, cfg_options=cfg_options)
    check_checkpoint_matches(model, summary, model.cfg, label)
    return model
