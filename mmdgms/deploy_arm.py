"""ctypes binding of the mobile runtime's packed-model API.

:class:`RuntimeDetector` loads a packed file (docs/packed-format.md) into
the C++ runtime of ``deploy_arm/`` and detects objects in preprocessed
images; :func:`attach_runtime` makes an MMDetection detector's ``predict``
run through it, so a Runner's test loop evaluates the runtime.

The shared library is ``deploy_arm/build/release/libdgms_model_c.so``
(built with CMake on first use when missing), or the path in the
environment variable ``DGMS_RT_LIBRARY``.
"""
import ctypes
import os
import shutil
import subprocess
from pathlib import Path
from typing import Optional, Sequence, Tuple

import numpy as np
import torch
from mmengine.logging import print_log

REPO_ROOT = Path(__file__).resolve().parents[1]
RUNTIME_DIR = REPO_ROOT / 'deploy_arm'
BUILD_DIR = RUNTIME_DIR / 'build' / 'release'
LIBRARY_NAME = 'libdgms_model_c.so'


class RuntimeFailure(RuntimeError):
    """An error reported by the C++ runtime, with its message."""


def build_library(build_dir: Path = BUILD_DIR) -> Path:
    """Configure and build the model library with CMake; return its path.

    An up-to-date build is reused (CMake rebuilds only what changed)."""
    if shutil.which('cmake') is None:
        raise RuntimeFailure('cmake is not installed; install the Debian '
                            'package cmake to build deploy_arm/')
    subprocess.run(['cmake', '-S', str(RUNTIME_DIR), '-B', str(build_dir),
                    '-DCMAKE_BUILD_TYPE=Release'],
                   check=True, capture_output=True, text=True)
    subprocess.run(['cmake', '--build', str(build_dir), '--target',
                    'dgms_model_c', 'dgms_detect', '-j', '2'],
                   check=True, capture_output=True, text=True)
    return build_dir / LIBRARY_NAME


def load_library(path: Optional[str] = None) -> ctypes.CDLL:
    """Open the runtime library (``path``, $DGMS_RT_LIBRARY, or a build)."""
    path = path or os.environ.get('DGMS_RT_LIBRARY')
    if path is None:
        path = str(build_library())
    lib = ctypes.CDLL(str(path))
    i64, f32p = ctypes.c_int64, ctypes.POINTER(ctypes.c_float)
    lib.dgms_model_last_error.restype = ctypes.c_char_p
    lib.dgms_model_load.argtypes = [ctypes.c_char_p, ctypes.c_int,
                                    ctypes.POINTER(ctypes.c_void_p)]
    lib.dgms_model_load_buffer.argtypes = [
        ctypes.c_char_p, i64, ctypes.c_int, ctypes.POINTER(ctypes.c_void_p)]
    lib.dgms_model_load_ex.argtypes = [
        ctypes.c_char_p, ctypes.c_int, i64, ctypes.POINTER(ctypes.c_void_p)]
    lib.dgms_model_load_buffer_ex.argtypes = [
        ctypes.c_char_p, i64, ctypes.c_int, i64,
        ctypes.POINTER(ctypes.c_void_p)]
    lib.dgms_model_destroy.argtypes = [ctypes.c_void_p]
    lib.dgms_model_kind.argtypes = [ctypes.c_void_p]
    lib.dgms_model_kind.restype = ctypes.c_char_p
    lib.dgms_model_detect.argtypes = [
        ctypes.c_void_p, f32p, i64, i64, i64, i64, ctypes.c_double,
        ctypes.c_double, ctypes.c_int, f32p, i64, ctypes.POINTER(i64)]
    return lib


def _pair(name: str, values, integral: bool) -> tuple:
    """Return `values` as two ints (integral) or floats, or raise a
    ValueError that names the argument."""
    try:
        pair = tuple(values)
    except TypeError:
        pair = ()
    if len(pair) != 2:
        expected = '(height, width)' if integral else '(w_scale, h_scale)'
        raise ValueError(f'{name} is {values!r}, expected two values '
                         f'{expected}')
    result = []
    for value in pair:
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise ValueError(
                f'{name} is {values!r}, expected numbers') from None
        if integral and number != int(number):
            raise ValueError(f'{name} is {values!r}, expected whole pixel '
                             'counts')
        result.append(int(number) if integral else number)
    return tuple(result)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


class RuntimeDetector:
    """A packed single-stage detector running in the C++ runtime.

    Args:
        source: path of a packed file, or its bytes.
        threads: threads of the runtime's convolutions.
        library: path of libdgms_model_c.so (default: see module doc).
        max_detections: capacity of the result buffer per image.
        quant_winograd_max_bytes: largest Winograd filters, in bytes, that
            a quantized 3x3 stride-1 layer keeps and runs on its decoded
            weights; 0 runs the codebook kernels only. None keeps the
            runtime's default (1 MiB).
    """

    def __init__(self, source, threads: int = 1,
                 library: Optional[str] = None,
                 max_detections: int = 100000,
                 quant_winograd_max_bytes: Optional[int] = None):
        if not _is_int(threads) or not 1 <= threads <= 256:
            raise ValueError(f'threads is {threads!r}, expected an integer '
                             'from 1 to 256')
        if quant_winograd_max_bytes is not None and (
                not _is_int(quant_winograd_max_bytes)
                or not 0 <= quant_winograd_max_bytes < 1 << 62):
            raise ValueError('quant_winograd_max_bytes is '
                             f'{quant_winograd_max_bytes!r}, expected a '
                             'byte count from 0 (codebook kernels only) to '
                             '2**62 - 1, or None for the default')
        self.lib = load_library(library)
        self.max_detections = max_detections
        handle = ctypes.c_void_p()
        # The _ex loaders take the cap after `threads`; the others use the
        # runtime's default.
        cap = () if quant_winograd_max_bytes is None else (
            quant_winograd_max_bytes, )
        if isinstance(source, (bytes, bytearray)):
            load = (self.lib.dgms_model_load_buffer_ex if cap
                    else self.lib.dgms_model_load_buffer)
            status = load(bytes(source), len(source), threads, *cap,
                          ctypes.byref(handle))
        else:
            load = (self.lib.dgms_model_load_ex if cap
                    else self.lib.dgms_model_load)
            status = load(str(source).encode(), threads, *cap,
                          ctypes.byref(handle))
        if status != 0:
            raise RuntimeFailure(self.lib.dgms_model_last_error().decode())
        self.handle = handle

    def close(self) -> None:
        if getattr(self, 'handle', None):
            self.lib.dgms_model_destroy(self.handle)
            self.handle = None

    def __del__(self):
        self.close()

    @property
    def kind(self) -> str:
        return self.lib.dgms_model_kind(self.handle).decode()

    def detect(self, image: np.ndarray, img_shape: Sequence[int],
               scale_factor: Sequence[float], rescale: bool = True
               ) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Detect objects in one preprocessed image.

        Args:
            image: float32 (3, H, W), normalised and padded.
            img_shape: (height, width) after resizing, before padding.
            scale_factor: (w_scale, h_scale) of the resize.
            rescale: return boxes in original-image pixels.

        Returns:
            bboxes (n, 4) as x1, y1, x2, y2, scores (n,), labels (n,),
            by descending score.
        """
        if not getattr(self, 'handle', None):
            raise RuntimeFailure('the detector is closed: create a new '
                                 'RuntimeDetector')
        image = np.asarray(image)
        if not np.issubdtype(image.dtype, np.floating):
            raise ValueError(
                f'image has dtype {image.dtype}, expected float32: pass the '
                "normalised tensor from the model's data_preprocessor, not "
                'raw pixels')
        image = np.ascontiguousarray(image, dtype=np.float32)
        if image.ndim != 3 or image.shape[0] != 3:
            raise ValueError(f'image must be (3, H, W), got {image.shape}')
        img_shape = _pair('img_shape', img_shape, integral=True)
        scale_factor = _pair('scale_factor', scale_factor, integral=False)
        out = np.empty((self.max_detections, 6), np.float32)
        count = ctypes.c_int64()
        f32p = ctypes.POINTER(ctypes.c_float)
        status = self.lib.dgms_model_detect(
            self.handle, image.ctypes.data_as(f32p), image.shape[1],
            image.shape[2], img_shape[0], img_shape[1], scale_factor[0],
            scale_factor[1], int(rescale),
            out.ctypes.data_as(f32p), self.max_detections,
            ctypes.byref(count))
        if status != 0:
            raise RuntimeFailure(self.lib.dgms_model_last_error().decode())
        result = out[:count.value]
        return (result[:, :4].copy(), result[:, 4].copy(),
                result[:, 5].astype(np.int64))

    def predict(self, inputs: torch.Tensor, data_samples, rescale=True):
        """Fill ``pred_instances`` of MMDetection data samples for a batch
        that the detector's data_preprocessor produced."""
        from mmengine.structures import InstanceData
        for image, sample in zip(inputs, data_samples):
            bboxes, scores, labels = self.detect(
                image.detach().cpu().numpy(), sample.img_shape,
                sample.scale_factor, rescale)
            results = InstanceData()
            results.bboxes = torch.from_numpy(bboxes)
            results.scores = torch.from_numpy(scores)
            results.labels = torch.from_numpy(labels)
            sample.pred_instances = results
        return data_samples


def attach_runtime(detector, runtime: RuntimeDetector):
    """Make ``detector.predict`` run ``runtime``: the detector keeps its
    data preprocessor (MMDetection's normalisation and padding), and the
    tensor goes through the C++ runtime."""
    if runtime.kind != 'single_stage':
        raise ValueError(f'the runtime detects with single_stage models, '
                         f'this one is {runtime.kind}')
    detector.predict = runtime.predict
    print_log('detector predictions now come from the C++ runtime',
              logger='current')
    return detector
