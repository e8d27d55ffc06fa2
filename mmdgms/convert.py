"""Select conv layers of a model by name pattern and swap in DGMS convs."""
import fnmatch
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Dict, List, Optional, Sequence, Tuple

from torch import nn

from .ops import DGMSConv2d, convertible_conv_types
from .quant import check_bits

DEFAULT_INCLUDE = ('backbone.*', 'neck.*')
# Set on a model once its conv layers are converted, by DGMSHook or by the
# DGMSDetector model builder, so that a converted model is never converted
# twice (a runner may call before_run again, e.g. testing after training).
CONVERTED_FLAG = '_dgms_converted'
# The DGMSConfig that the DGMSDetector builder converted the model with.
CONVERSION_CONFIG_ATTR = '_dgms_config'


@dataclass
class DGMSConfig:
    """Layer selection and mixture settings of a DGMS conversion.

    Args:
        bits (int): bits per weight for every selected layer, 1 to 8.
            Default: 4.
        include (Sequence[str]): fnmatch patterns over full module names
            (as in ``model.named_modules()``); a conv layer is selected when
            it matches any of them. Default: ``('backbone.*', 'neck.*')``,
            so detection heads stay in full precision.
        exclude (Sequence[str]): patterns of layers to leave in full
            precision even though ``include`` selects them. Default: ().
        skip_stem (bool): leave the backbone's first conv layer (the one
            that reads the image) in full precision. Default: True.
        layer_bits (dict): per-layer bit widths, fnmatch pattern -> bits,
            for the selected layers. When several patterns match a layer,
            the first one in the dict's order (the order written in the
            config) sets its bits, so put specific patterns before general
            ones. A layer that no pattern matches gets ``bits``.
            :func:`select_layers` rejects a pattern that matches no selected
            layer, or whose layers all take their bits from earlier
            patterns. Default: {}.
        init_temperature, learn_temperature, min_std, min_temperature: as
            for :class:`~mmdgms.quant.GaussianMixtureQuantizer`.
    """
    bits: int = 4
    include: Sequence[str] = DEFAULT_INCLUDE
    exclude: Sequence[str] = ()
    skip_stem: bool = True
    layer_bits: Dict[str, int] = field(default_factory=dict)
    init_temperature: float = 0.01
    learn_temperature: bool = True
    min_std: float = 1e-6
    min_temperature: float = 1e-4

    def __post_init__(self):
        check_bits(self.bits)
        self.include = _as_patterns(self.include, 'include')
        self.exclude = _as_patterns(self.exclude, 'exclude')
        if not self.include:
            raise ValueError('include is empty: give at least one module '
                             "name pattern, e.g. include=['backbone.*']")
        self.layer_bits = _as_layer_bits(self.layer_bits)

    def layer_bits_pattern(self, name: str) -> Optional[str]:
        """Return the first ``layer_bits`` pattern that matches ``name``."""
        for pattern in self.layer_bits:
            if fnmatch.fnmatchcase(name, pattern):
                return pattern
        return None

    def bits_of(self, name: str) -> int:
        """Return the bit width that the config gives the layer ``name``."""
        pattern = self.layer_bits_pattern(name)
        return self.bits if pattern is None else self.layer_bits[pattern]

    def differences(self, other: 'DGMSConfig') -> Dict[str, tuple]:
        """Return field name -> (own value, other value) where they differ."""
        return {
            f.name: (getattr(self, f.name), getattr(other, f.name))
            for f in fields(self)
            if getattr(self, f.name) != getattr(other, f.name)
        }

    def mixture_cfg(self, name: str) -> dict:
        return dict(bits=self.bits_of(name),
                    init_temperature=self.init_temperature,
                    learn_temperature=self.learn_temperature,
                    min_std=self.min_std,
                    min_temperature=self.min_temperature)


def _as_patterns(value, name: str) -> Tuple[str, ...]:
    if isinstance(value, str):
        value = (value, )
    patterns = tuple(value or ())
    for pattern in patterns:
        if not isinstance(pattern, str) or not pattern:
            raise ValueError(f'{name} must be a list of non-empty module name '
                             f'patterns, got {value!r}')
    return patterns


def _as_layer_bits(value) -> Dict[str, int]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise ValueError(
            'layer_bits must be a dict of module name pattern -> bits, e.g. '
            f"{{'backbone.layer1.*': 8}}, got {value!r}")
    layer_bits = {}
    for pattern, bits in value.items():
        if not isinstance(pattern, str) or not pattern:
            raise ValueError(
                'layer_bits keys must be non-empty module name patterns, '
                f'got {pattern!r} in layer_bits={dict(value)!r}')
        layer_bits[pattern] = check_bits(bits, f'layer_bits[{pattern!r}]')
    return layer_bits


def check_layer_bits(cfg: DGMSConfig, selected: List[str]) -> None:
    """Raise ValueError for a ``layer_bits`` pattern that sets no layer's bits.

    A pattern has no effect when it matches none of the ``selected`` layers,
    or when every layer it matches is matched by an earlier pattern first.
    """
    for pattern in cfg.layer_bits:
        matched = [n for n in selected if fnmatch.fnmatchcase(n, pattern)]
        if not matched:
            raise ValueError(
                f'layer_bits pattern {pattern!r} matches none of the '
                f'{len(selected)} quantized layers (e.g. {selected[0]}); '
                'remove it or fix the name')
        winners = {cfg.layer_bits_pattern(n) for n in matched}
        if pattern not in winners:
            earlier = ', '.join(repr(p) for p in cfg.layer_bits
                                if p in winners)
            raise ValueError(
                f'layer_bits pattern {pattern!r} sets no layer\'s bits: every '
                f'layer it matches ({len(matched)}, e.g. {matched[0]}) is '
                f'matched first by the earlier pattern(s) {earlier}, and the '
                'first matching pattern wins. Put the more specific pattern '
                'first or remove it')


def find_stem_conv(model: nn.Module) -> Optional[str]:
    """Return the name of the first conv layer under ``backbone``, if any."""
    for name, module in model.named_modules():
        if name.startswith('backbone.') and isinstance(
                module, (nn.Conv2d, DGMSConv2d)):
            return name
    return None


def _describe(names: List[str], modules: Dict[str, nn.Module],
              limit: int = 5) -> str:
    listed = ', '.join(f'{n} ({type(modules[n]).__name__})'
                       for n in names[:limit])
    more = len(names) - limit
    return listed + (f' and {more} more' if more > 0 else '')


def select_layers(model: nn.Module, cfg: DGMSConfig) -> List[str]:
    """Return the names of the conv layers that ``cfg`` selects.

    Raises:
        ValueError: a pattern matches no conv layer (it names nothing, or
            only non-conv modules such as BatchNorm), an exclude pattern
            matches nothing, a layer_bits pattern sets no layer's bits (see
            :func:`check_layer_bits`), or nothing is left to quantize.
        TypeError: a selected module is a Conv2d subclass with its own
            forward (weight standardisation, adaptive padding, ...), which
            DGMS cannot quantize without changing what the layer computes.
    """
    modules = dict(model.named_modules())
    convertible = convertible_conv_types()
    convs = [
        n for n, m in modules.items()
        if isinstance(m, (nn.Conv2d, DGMSConv2d))
    ]

    for pattern in cfg.include:
        matched = [n for n in modules if n and fnmatch.fnmatchcase(n, pattern)]
        if not matched:
            raise ValueError(
                f'include pattern {pattern!r} matches no module of '
                f'{type(model).__name__}. Module names look like '
                f'{_describe(convs, modules, 3)}; check the pattern against '
                'model.named_modules()')
        if not any(n in convs for n in matched):
            raise ValueError(
                f'include pattern {pattern!r} matches no conv layer, only '
                f'{_describe(matched, modules)}: DGMS quantizes nn.Conv2d '
                'layers, so name conv layers or a parent pattern such as '
                "'backbone.*'")
    for pattern in cfg.exclude:
        if not any(fnmatch.fnmatchcase(n, pattern) for n in modules if n):
            raise ValueError(
                f'exclude pattern {pattern!r} matches no module of '
                f'{type(model).__name__}; remove it or fix the name')

    stem = find_stem_conv(model) if cfg.skip_stem else None
    selected = []
    for name in convs:
        if not any(fnmatch.fnmatchcase(name, p) for p in cfg.include):
            continue
        if any(fnmatch.fnmatchcase(name, p) for p in cfg.exclude):
            continue
        if name == stem:
            continue
        module = modules[name]
        if not isinstance(module, DGMSConv2d) and type(module) not in convertible:
            raise TypeError(
                f'{name} is a {type(module).__module__}.'
                f'{type(module).__name__}, a Conv2d subclass with its own '
                'forward that DGMS cannot quantize; add '
                f"'{name}' to exclude to keep it in full precision")
        selected.append(name)

    if not selected:
        hint = (f'; {stem} is the stem, set skip_stem=False to quantize it'
                if stem is not None and any(
                    fnmatch.fnmatchcase(stem, p) for p in cfg.include) else '')
        raise ValueError(
            f'include={list(cfg.include)} and exclude={list(cfg.exclude)} '
            f'(skip_stem={cfg.skip_stem}) leave no conv layer to quantize in '
            f'{type(model).__name__}{hint}')
    check_layer_bits(cfg, selected)
    return selected


def _check_prebuilt_bits(cfg: DGMSConfig, name: str,
                         module: DGMSConv2d) -> None:
    pattern = cfg.layer_bits_pattern(name)
    if pattern is not None and cfg.layer_bits[pattern] != module.bits:
        raise ValueError(
            f'{name} is built as a {module.bits}-bit DGMSConv by the model '
            f'config (conv_cfg), but layer_bits[{pattern!r}] requests '
            f'{cfg.layer_bits[pattern]} bits. Set the bits in conv_cfg, or '
            'build the layer as a plain conv and let layer_bits choose')


def convert_model(model: nn.Module, cfg: DGMSConfig) -> Dict[str, DGMSConv2d]:
    """Replace the selected conv layers of ``model`` in place.

    Layers that already are :class:`DGMSConv2d` (built through
    ``conv_cfg=dict(type='DGMSConv')``) are kept as they are, bit width
    included. A ``layer_bits`` pattern that requests another bit width for
    such a layer is a ValueError. The new layers take over the original
    weight and bias Parameter objects, and their mixtures are left
    uninitialised.

    Returns:
        dict: module name -> DGMSConv2d for every selected layer.
    """
    layers = {}
    for name in select_layers(model, cfg):
        parent_name, _, child = name.rpartition('.')
        parent = model.get_submodule(parent_name) if parent_name else model
        module = getattr(parent, child)
        if isinstance(module, DGMSConv2d):
            _check_prebuilt_bits(cfg, name, module)
        else:
            module = DGMSConv2d.from_conv(module, **cfg.mixture_cfg(name))
            setattr(parent, child, module)
        module.layer_name = name
        layers[name] = module
    return layers


def dgms_layers(model: nn.Module) -> Dict[str, DGMSConv2d]:
    """Return module name -> layer for every DGMSConv2d in ``model``."""
    return {
        name: module
        for name, module in model.named_modules()
        if isinstance(module, DGMSConv2d)
    }
