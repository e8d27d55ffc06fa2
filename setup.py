from setuptools import find_packages, setup
from torch.utils.cpp_extension import BuildExtension, CppExtension

# The fused DGMS kernels. -fopenmp makes at::parallel_for use threads (it is
# an inline template that runs serially without it). -fno-trapping-math lets
# GCC turn the clamps and floors of the vectorised exp into selects; without
# it the loops are not vectorised at all.
fused_kernels = CppExtension(
    'mmdgms.quant._fused',
    ['mmdgms/quant/csrc/soft_weight.cpp'],
    extra_compile_args=['-O3', '-fopenmp', '-fno-trapping-math',
                        '-fno-math-errno'],
    extra_link_args=['-fopenmp'])

setup(
    name='mmdgms',
    version='0.1.0',
    description='Differentiable Gaussian-mixture weight sharing (DGMS) '
    'quantization for MMDetection detectors',
    packages=find_packages(include=['mmdgms', 'mmdgms.*']),
    ext_modules=[fused_kernels],
    cmdclass={'build_ext': BuildExtension},
    python_requires='>=3.8',
    install_requires=[
        'torch>=2.0',
        'mmengine>=0.10.0,<1.0.0',
        'mmcv>=2.0.0,<2.2.0',
        'mmdet>=3.0.0,<3.4.0',
        'pycocotools',
        'numpy',
    ],
    extras_require={
        # tools/export_onnx.py; the versions tools/setup_env.sh installs.
        'onnx': ['onnx==1.23.2', 'onnxruntime==1.31.1'],
    },
)
