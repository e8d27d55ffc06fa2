"""A drop-in replacement for ``nn.Conv2d`` with DGMS weight sharing."""
from contextlib import contextmanager
from typing import Iterator, Optional, Tuple

import torch
from mmengine.registry import MODELS
from torch import Tensor, nn

from ..quant import GaussianMixtureQuantizer


@MODELS.register_module('DGMSConv')
class DGMSConv2d(nn.Conv2d):
    """2-D convolution whose weights are quantized by a Gaussian mixture.

    ``weight`` stays the full-precision latent parameter. In training mode
    the convolution uses the soft weights sum_k r_k(w) mu_k, so the detection
    loss trains the latent weights and the mixture together. In evaluation
    mode it uses the hard weights, where each weight is replaced by the mean
    of its most responsible component.

    Hard weights cost K passes over the weights. They are computed for every
    forward call unless the hard-weight cache is enabled
    (:meth:`enable_hard_weight_cache`, or :func:`hard_weight_cache` for a
    whole model; DGMSHook enables it for each validation and test epoch).
    Then they are computed at the first evaluation forward and reused until
    a weight or mixture parameter changes, the layer is switched to training
    or the cache is disabled.

    Build it from a config (``conv_cfg=dict(type='DGMSConv', bits=4)`` in any
    MMCV/MMDetection module that takes a ``conv_cfg``) or convert an existing
    layer with :meth:`from_conv`.

    Args:
        in_channels, out_channels, kernel_size, stride, padding, dilation,
            groups, bias, padding_mode: as for ``nn.Conv2d``.
        bits (int): bits per weight, 1 to 8 (K = 2 ** bits components).
            Default: 4.
        init_temperature (float): starting temperature. Default: 0.01.
        learn_temperature (bool): train the temperature. Default: True.
        min_std (float): lower bound on standard deviations. Default: 1e-6.
        min_temperature (float): lower bound on the temperature.
            Default: 1e-4.
    """

    def __init__(self,
                 in_channels: int,
                 out_channels: int,
                 kernel_size,
                 stride=1,
                 padding=0,
                 dilation=1,
                 groups: int = 1,
                 bias: bool = True,
                 padding_mode: str = 'zeros',
                 bits: int = 4,
                 init_temperature: float = 0.01,
                 learn_temperature: bool = True,
                 min_std: float = 1e-6,
                 min_temperature: float = 1e-4,
                 device=None,
                 dtype=None):
        super().__init__(in_channels, out_channels, kernel_size, stride,
                         padding, dilation, groups, bias, padding_mode,
                         device=device, dtype=dtype)
        self.mixture = GaussianMixtureQuantizer(
            bits=bits,
            init_temperature=init_temperature,
            learn_temperature=learn_temperature,
            min_std=min_std,
            min_temperature=min_temperature)
        self.hard_weight_cache_enabled = False
        self._hard_cache: Optional[Tuple[tuple, tuple, Tensor]] = None
        self.layer_name = 'DGMSConv2d'

    @property
    def bits(self) -> int:
        return self.mixture.bits

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, **mixture_cfg) -> 'DGMSConv2d':
        """Return a DGMSConv2d that takes over ``conv``'s weight and bias.

        The new layer uses the very same ``weight`` and ``bias`` Parameter
        objects, so an optimizer or a state dict that refers to them keeps
        working. The mixture is not initialised here: call
        ``layer.mixture.init_from_weights(layer.weight)`` once the trained
        weights are loaded.
        """
        if type(conv) not in convertible_conv_types():
            raise TypeError(
                f'cannot convert {type(conv).__module__}.'
                f'{type(conv).__name__}: DGMS replaces plain nn.Conv2d '
                'layers (and mmcv.cnn.Conv2d) only, whose forward is a bare '
                'convolution')
        with torch.device('meta'):
            layer = cls(conv.in_channels, conv.out_channels, conv.kernel_size,
                        conv.stride, conv.padding, conv.dilation, conv.groups,
                        conv.bias is not None, conv.padding_mode,
                        **mixture_cfg)
        layer.weight = conv.weight
        layer.bias = conv.bias
        # The mixture built under the meta device above has no storage.
        layer.mixture = GaussianMixtureQuantizer(**mixture_cfg).to(
            device=conv.weight.device)
        layer.train(conv.training)
        return layer

    def _cache_sources(self) -> tuple:
        return (self.weight, self.mixture.means, self.mixture.log_stds,
                self.mixture.mix_logits)

    @staticmethod
    def _fingerprint(tensor: Tensor) -> tuple:
        return (tensor.data_ptr(), tensor._version, tensor.dtype,
                tensor.device, tensor.shape)

    def _cache_matches(self) -> bool:
        # O(1) per tensor. The cache holds the source tensors themselves, so
        # a replaced Parameter cannot be freed and its id or storage reused.
        # Storage pointer and version counter catch ``.data`` reassignment,
        # dtype or device moves, load_state_dict and in-place edits through
        # the Parameter (with or without grad).
        # NOTE: in-place edits through ``.data`` (``p.data.add_(...)``) get a
        # fresh version counter and are not seen. Code that edits weights
        # that way while the cache is enabled must call
        # clear_hard_weight_cache().
        sources, fingerprints, _ = self._hard_cache
        return all(
            cached is live and fingerprint == self._fingerprint(live)
            for cached, fingerprint, live in zip(
                sources, fingerprints, self._cache_sources()))

    def enable_hard_weight_cache(self) -> None:
        """Reuse the hard weights across evaluation forwards.

        They are computed at the next evaluation forward, not here, so hooks
        that swap in other weights before evaluation (such as EMAHook) are
        seen.
        """
        self.hard_weight_cache_enabled = True
        self._hard_cache = None

    def disable_hard_weight_cache(self) -> None:
        """Compute the hard weights at every evaluation forward again."""
        self.hard_weight_cache_enabled = False
        self._hard_cache = None

    def clear_hard_weight_cache(self) -> None:
        """Drop the cached hard weights; the next forward recomputes them."""
        self._hard_cache = None

    def quantized_weight(self) -> Tensor:
        """Return the weights this layer convolves with in its current mode.

        Training mode: the soft weights. Evaluation mode: the hard weights,
        from the cache when it is enabled and still matches the weights and
        the mixture.
        """
        self.mixture.check_initialized(self.layer_name)
        if self.training:
            self._hard_cache = None
            return self.mixture.soft_weights(self.weight)

        if not self.hard_weight_cache_enabled:
            return self.mixture.hard_weights(self.weight)
        if self._hard_cache is None or not self._cache_matches():
            sources = self._cache_sources()
            fingerprints = tuple(self._fingerprint(t) for t in sources)
            self._hard_cache = (sources, fingerprints,
                                self.mixture.hard_weights(self.weight))
        return self._hard_cache[2]

    def forward(self, x: Tensor) -> Tensor:
        return self._conv_forward(x, self.quantized_weight(), self.bias)

    def train(self, mode: bool = True):
        if mode:
            self.hard_weight_cache_enabled = False
        self._hard_cache = None
        return super().train(mode)

    def extra_repr(self) -> str:
        return super().extra_repr() + f', bits={self.bits}'


def convertible_conv_types() -> tuple:
    """Return the conv classes whose forward is a plain F.conv2d call."""
    types = [nn.Conv2d]
    try:
        from mmcv.cnn.bricks.wrappers import Conv2d as MMCVConv2d
        types.append(MMCVConv2d)
    except ImportError:  # mmcv is optional for the quantizer itself
        pass
    return tuple(types)


def set_hard_weight_cache(model: nn.Module, enabled: bool) -> int:
    """Enable or disable the hard-weight cache of every DGMSConv2d in
    ``model``; return the number of layers changed."""
    layers = [m for m in model.modules() if isinstance(m, DGMSConv2d)]
    for layer in layers:
        if enabled:
            layer.enable_hard_weight_cache()
        else:
            layer.disable_hard_weight_cache()
    return len(layers)


@contextmanager
def hard_weight_cache(model: nn.Module) -> Iterator[nn.Module]:
    """Reuse hard weights across the evaluation forwards inside the block.

    Example:
        >>> with hard_weight_cache(model):
        ...     for batch in loader:
        ...         model.test_step(batch)
    """
    set_hard_weight_cache(model, True)
    try:
        yield model
    finally:
        set_hard_weight_cache(model, False)
