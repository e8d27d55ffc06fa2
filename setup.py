from setuptools import find_packages, setup

setup(
    name='mmdgms',
    version='0.1.0',
    description='Differentiable Gaussian-mixture weight sharing (DGMS) '
    'quantization for MMDetection detectors',
    packages=find_packages(include=['mmdgms', 'mmdgms.*']),
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
