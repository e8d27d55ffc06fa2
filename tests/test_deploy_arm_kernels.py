"""The mobile runtime's C API through ctypes, against torch's conv2d.

The runtime (``deploy_arm/``) is built with CMake into
``deploy_arm/build/release`` (an up-to-date build is reused). Each case
packs random codebook indices into the canonical LSB-first bit stream here,
independently of the C++ packing code, runs the quantized conv with both
kernels (accumulate and lookup) and compares it with
``torch.nn.functional.conv2d`` on the decoded weights, then the per-channel
scale, bias and activation. Tolerance: 1e-4 absolute plus 1e-4
relative (float32 sums in different orders).
"""
import ctypes
import itertools
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

REPO_ROOT = Path(__file__).resolve().parents[1]
RUNTIME_DIR = REPO_ROOT / 'deploy_arm'
BUILD_DIR = RUNTIME_DIR / 'build' / 'release'

ISA_AUTO, ISA_SCALAR = 0, 1
ACT_NONE, ACT_RELU, ACT_RELU6 = 0, 1, 2
KERNEL_ACCUMULATE, KERNEL_LOOKUP = 1, 2


class ConvGeometry(ctypes.Structure):
    _fields_ = [(name, ctypes.c_int64) for name in (
        'out_channels', 'in_channels', 'groups', 'kernel_h', 'kernel_w',
        'stride_h', 'stride_w', 'pad_h', 'pad_w', 'dilation_h', 'dilation_w')]


def build_runtime() -> Path:
    """Build the C-API library with CMake and return its path."""
    if shutil.which('cmake') is None:
        pytest.fail('cmake is not installed; install the Debian package '
                    'cmake to build deploy_arm/')
    subprocess.run(['cmake', '-S', str(RUNTIME_DIR), '-B', str(BUILD_DIR),
                    '-DCMAKE_BUILD_TYPE=Release'],
                   check=True, capture_output=True, text=True)
    subprocess.run(['cmake', '--build', str(BUILD_DIR), '--target',
                    'dgms_runtime_c', '-j', '2'],
                   check=True, capture_output=True, text=True)
    return BUILD_DIR / 'libdgms_runtime_c.so'


@pytest.fixture(scope='module')
def runtime():
    lib = ctypes.CDLL(str(build_runtime()))
    f32p = ctypes.POINTER(ctypes.c_float)
    i64 = ctypes.c_int64
    lib.dgms_last_error.restype = ctypes.c_char_p
    lib.dgms_best_isa.restype = ctypes.c_int
    lib.dgms_isa_name.restype = ctypes.c_char_p
    lib.dgms_isa_name.argtypes = [ctypes.c_int]
    lib.dgms_thread_pool_create.argtypes = [
        ctypes.c_int, ctypes.POINTER(ctypes.c_void_p)]
    lib.dgms_thread_pool_destroy.argtypes = [ctypes.c_void_p]
    lib.dgms_quant_conv_create.argtypes = [
        ctypes.POINTER(ConvGeometry), ctypes.c_int, f32p, i64,
        ctypes.POINTER(ctypes.c_uint8), i64, f32p, i64, f32p, i64,
        ctypes.c_int, ctypes.c_int, ctypes.c_int,
        ctypes.POINTER(ctypes.c_void_p)]
    lib.dgms_conv_destroy.argtypes = [ctypes.c_void_p]
    lib.dgms_conv_isa.argtypes = [ctypes.c_void_p]
    lib.dgms_conv_quant_kernel.argtypes = [ctypes.c_void_p]
    lib.dgms_conv_output_size.argtypes = [
        ctypes.c_void_p, i64, i64, ctypes.POINTER(i64), ctypes.POINTER(i64)]
    lib.dgms_conv_run.argtypes = [
        ctypes.c_void_p, f32p, i64, i64, i64, f32p, i64, ctypes.c_void_p]
    return lib


def pack_indices(indices: np.ndarray, bits: int) -> np.ndarray:
    """Pack indices LSB-first: index j takes stream bits [j*bits, (j+1)*bits)."""
    stream = (indices.astype(np.uint16)[:, None] >> np.arange(bits)) & 1
    return np.packbits(stream.astype(np.uint8).ravel(), bitorder='little')


def as_ptr(array: np.ndarray, ctype):
    return array.ctypes.data_as(ctypes.POINTER(ctype))


def create_quant_conv(lib, geometry, bits, codebook, packed, scale, bias,
                      activation, isa=ISA_AUTO, kernel=KERNEL_ACCUMULATE):
    """Create a layer; return (status, handle)."""
    handle = ctypes.c_void_p()
    status = lib.dgms_quant_conv_create(
        ctypes.byref(geometry), bits, as_ptr(codebook, ctypes.c_float),
        codebook.size, as_ptr(packed, ctypes.c_uint8), packed.size,
        as_ptr(scale, ctypes.c_float), scale.size,
        as_ptr(bias, ctypes.c_float), bias.size, activation, isa, kernel,
        ctypes.byref(handle))
    return status, handle


# (in, out, groups, kernel, stride, padding, dilation, height, width)
CASES = [
    (5, 7, 1, (3, 3), (1, 1), (1, 1), (1, 1), 11, 13),
    (8, 6, 1, (1, 1), (2, 2), (0, 0), (1, 1), 9, 10),
    (6, 9, 3, (3, 3), (2, 1), (1, 2), (1, 2), 12, 15),
    (12, 12, 12, (3, 3), (2, 2), (1, 1), (1, 1), 17, 9),
    (3, 16, 1, (7, 7), (2, 2), (3, 3), (1, 1), 21, 19),
    (4, 5, 1, (3, 3), (1, 1), (2, 2), (2, 2), 1, 1),
]


@pytest.mark.parametrize('bits', [1, 2, 4, 8])
@pytest.mark.parametrize('case', CASES, ids=lambda c: f'{c[0]}-{c[1]}-g{c[2]}'
                         f'-k{c[3][0]}-s{c[4][0]}{c[4][1]}')
def test_quant_conv_matches_torch(runtime, case, bits):
    cin, cout, groups, kernel, stride, padding, dilation, height, width = case
    gen = torch.Generator().manual_seed(bits * 100 + cin)
    entries = 2 ** bits
    weight_shape = (cout, cin // groups, *kernel)

    codebook = torch.rand(entries, generator=gen) * 2 - 1
    codebook[0] = 0.0
    indices = torch.randint(0, entries, weight_shape, generator=gen)
    pruned = torch.rand(weight_shape, generator=gen) < 0.3
    indices[pruned] = 0
    scale = torch.rand(cout, generator=gen) + 0.5
    bias = torch.rand(cout, generator=gen) - 0.5
    x = torch.randn(1, cin, height, width, generator=gen)
    activation = (ACT_NONE, ACT_RELU, ACT_RELU6)[bits % 3]

    expected = F.conv2d(x, codebook[indices], stride=stride, padding=padding,
                        dilation=dilation, groups=groups)
    expected = expected * scale[:, None, None] + bias[:, None, None]
    if activation == ACT_RELU:
        expected = expected.clamp(min=0)
    elif activation == ACT_RELU6:
        expected = expected.clamp(0, 6)

    geometry = ConvGeometry(cout, cin, groups, *kernel, *stride, *padding,
                            *dilation)
    packed = pack_indices(indices.numpy().ravel(), bits)
    assert packed.size == (indices.numel() * bits + 7) // 8
    codebook_np = codebook.numpy().astype(np.float32)
    scale_np = scale.numpy().astype(np.float32)
    bias_np = bias.numpy().astype(np.float32)
    x_np = np.ascontiguousarray(x.numpy()[0], dtype=np.float32)

    pool = ctypes.c_void_p()
    assert runtime.dgms_thread_pool_create(2, ctypes.byref(pool)) == 0
    try:
        for isa, kernel in itertools.product(
                (ISA_AUTO, ISA_SCALAR), (KERNEL_ACCUMULATE, KERNEL_LOOKUP)):
            status, conv = create_quant_conv(
                runtime, geometry, bits, codebook_np, packed, scale_np,
                bias_np, activation, isa, kernel)
            assert status == 0, runtime.dgms_last_error().decode()
            try:
                assert runtime.dgms_conv_quant_kernel(conv) == kernel
                out_h, out_w = ctypes.c_int64(), ctypes.c_int64()
                assert runtime.dgms_conv_output_size(
                    conv, height, width, ctypes.byref(out_h),
                    ctypes.byref(out_w)) == 0
                assert (out_h.value, out_w.value) == tuple(expected.shape[2:])

                out = np.full((cout, out_h.value, out_w.value), np.nan,
                              dtype=np.float32)
                status = runtime.dgms_conv_run(
                    conv, as_ptr(x_np, ctypes.c_float), x_np.size, height,
                    width, as_ptr(out, ctypes.c_float), out.size, pool)
                assert status == 0, runtime.dgms_last_error().decode()
                isa_name = runtime.dgms_isa_name(
                    runtime.dgms_conv_isa(conv)).decode()
                torch.testing.assert_close(
                    torch.from_numpy(out), expected[0], atol=1e-4, rtol=1e-4,
                    msg=lambda m: f'isa {isa_name}, kernel {kernel}: {m}')
            finally:
                runtime.dgms_conv_destroy(conv)
    finally:
        runtime.dgms_thread_pool_destroy(pool)


def test_short_indices_rejected(runtime):
    geometry = ConvGeometry(4, 3, 1, 3, 3, 1, 1, 1, 1, 1, 1)
    codebook = np.array([0.0, 0.5, -0.5, 1.0], dtype=np.float32)
    packed = pack_indices(np.ones(4 * 3 * 9, dtype=np.uint8), 2)[:-1].copy()
    ones = np.ones(4, dtype=np.float32)

    status, conv = create_quant_conv(runtime, geometry, 2, codebook, packed,
                                     ones, ones, ACT_NONE)

    assert status == 1  # DGMS_INVALID_ARGUMENT
    assert not conv.value
    message = runtime.dgms_last_error().decode()
    assert 'indices has 26 bytes, expected' in message
    assert '= 27' in message
