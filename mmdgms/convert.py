"""Select conv layers of a model by name pattern and swap in DGMS convs."""
import fnmatch
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
        layer_bits (dict): pattern -> bits overrides; the first matching
            pattern wins. Default: {}.
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
        self.layer_bits = dict(self.layer_bits or {})
        for pattern, bits in self.layer_bits.items():
            check_bits(bits, f'layer_bits[{pattern!r}]')

    def differences(self, other: 'DGMSConfig') -> Dict[str, tuple]:
        """Return field name -> (own value, other value) where they differ."""
        return {
            f.name: (getattr(self, f.name), getattr(other, f.name))
            for f in fields(self)
            if getattr(self, f.name) != getattr(other, f.name)
        }

    def mixture_cfg(self, name: str) -> dict:
        bits = self.bits
        for pattern, pattern_bits in self.layer_bits.items():
            if fnmatch.fnmatchcase(name, pattern):
                bits = pattern_bits
                break
        return dict(bits=bits,
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
            matches nothing, a layer_bits pattern matches no quantized
            layer, or nothing is left to quantize.
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
    for pattern in cfg.layer_bits:
        if not any(fnmatch.fnmatchcase(n, pattern) for n in selected):
            raise ValueError(
                f'layer_bits pattern {pattern!r} matches none of the '
                f'{len(selected)} quantized layers (e.g. {selected[0]}); '
                'remove it or fix the name')
    return selected


def convert_model(model: nn.Module, cfg: DGMSConfig) -> Dict[str, DGMSConv2d]:
    """Replace the selected conv layers of ``model`` in place.

    Layers that already are :class:`DGMSConv2d` (built through
    ``conv_cfg=dict(type='DGMSConv')``) are kept as they are. The new layers
    take over the original weight and bias Parameter objects, and their
    mixtures are left uninitialised.

    Returns:
        dict: module name -> DGMSConv2d for every selected layer.
    """
    layers = {}
    for name in select_layers(model, cfg):
        parent_name, _, child = name.rpartition('.')
        parent = model.get_submodule(parent_name) if parent_name else model
        module = getattr(parent, child)
        if not isinstance(module, DGMSConv2d):
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
