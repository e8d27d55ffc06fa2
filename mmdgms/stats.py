"""Per-layer and total statistics of the hard-quantized weights."""
from typing import Dict, List

import torch
from torch import nn

from .convert import dgms_layers


@torch.no_grad()
def layer_stats(model: nn.Module) -> List[dict]:
    """Return one dict per DGMS layer of ``model``, in module order.

    Keys: ``name``, ``bits``, ``params`` (number of weights), ``sparsity``
    (fraction of weights in component 0, i.e. exactly zero),
    ``used_components`` (components that hold at least one weight),
    ``codebook_usage`` (``used_components`` over the ``2**bits``
    components), ``codebook_min`` / ``codebook_max`` (range of the used
    codebook values) and ``temperature``.
    """
    rows = []
    for name, layer in dgms_layers(model).items():
        mixture = layer.mixture
        if not mixture.initialized:
            continue
        indices, codebook = mixture.quantize(layer.weight)
        counts = torch.bincount(indices.reshape(-1).long(),
                                minlength=mixture.num_components)
        used = codebook[counts > 0]
        rows.append(
            dict(name=name,
                 bits=mixture.bits,
                 params=int(indices.numel()),
                 sparsity=float(counts[0]) / indices.numel(),
                 used_components=int((counts > 0).sum()),
                 codebook_usage=float((counts > 0).sum()) /
                 mixture.num_components,
                 codebook_min=float(used.min()),
                 codebook_max=float(used.max()),
                 temperature=float(mixture.temperature)))
    return rows


def total_stats(rows: List[dict]) -> Dict[str, float]:
    """Return totals over the rows of :func:`layer_stats`.

    ``sparsity`` and ``bits`` (average bits per weight) are weighted by each
    layer's number of weights. ``temperature`` is the mean over layers, and
    ``codebook_usage`` is the fraction of all layers' components that hold
    at least one weight.
    """
    params = sum(r['params'] for r in rows)
    if params == 0:
        return dict(layers=0, params=0, sparsity=0.0, bits=0.0)
    zeros = sum(r['sparsity'] * r['params'] for r in rows)
    bits = sum(r['bits'] * r['params'] for r in rows)
    used = sum(r['used_components'] for r in rows)
    components = sum(2**r['bits'] for r in rows)
    return dict(layers=len(rows),
                params=params,
                sparsity=zeros / params,
                bits=bits / params,
                temperature=sum(r['temperature'] for r in rows) / len(rows),
                codebook_usage=used / components,
                codebook_min=min(r['codebook_min'] for r in rows),
                codebook_max=max(r['codebook_max'] for r in rows))


def bit_width_stats(model: nn.Module) -> Dict[str, object]:
    """Return the bit widths of the DGMS layers of ``model``.

    Unlike :func:`layer_stats` this needs no initialised mixture. Keys:
    ``layers`` (count), ``params`` (number of quantized weights),
    ``avg_bits`` (bits per weight, weighted by each layer's number of
    weights), ``layers_per_bits`` and ``params_per_bits`` (bits -> number
    of layers or weights at that bit width, in ascending bits).
    """
    layers = dgms_layers(model)
    params = sum(m.weight.numel() for m in layers.values())
    weighted = sum(m.bits * m.weight.numel() for m in layers.values())
    layers_per_bits, params_per_bits = {}, {}
    for layer in layers.values():
        layers_per_bits[layer.bits] = layers_per_bits.get(layer.bits, 0) + 1
        params_per_bits[layer.bits] = (params_per_bits.get(layer.bits, 0) +
                                       layer.weight.numel())
    return dict(layers=len(layers),
                params=params,
                avg_bits=weighted / params if params else 0.0,
                layers_per_bits=dict(sorted(layers_per_bits.items())),
                params_per_bits=dict(sorted(params_per_bits.items())))


def format_table(rows: List[dict]) -> str:
    """Return the rows as a fixed-width text table with a total line."""
    header = (f'{"layer":<48} {"bits":>4} {"params":>10} {"sparsity":>8} '
              f'{"used":>5} {"codebook range":>24}')
    lines = [header, '-' * len(header)]
    for r in rows:
        lines.append(f'{r["name"]:<48} {r["bits"]:>4} {r["params"]:>10} '
                     f'{r["sparsity"]:>8.3f} {r["used_components"]:>5} '
                     f'[{r["codebook_min"]:>+10.4f}, {r["codebook_max"]:>+10.4f}]')
    total = total_stats(rows)
    lines.append('-' * len(header))
    if rows:
        lines.append(f'{"total (" + str(total["layers"]) + " layers)":<48} '
                     f'{total["bits"]:>4.2f} {total["params"]:>10} '
                     f'{total["sparsity"]:>8.3f}')
        lines.append(f'average bits per weight: {total["bits"]:.3f} '
                     '(weighted by the layers\' number of weights)')
    return '\n'.join(lines)
