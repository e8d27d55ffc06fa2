"""Warning filters that the scripts under tools/ install before importing
mmengine, mmcv or mmdet.

Importing this module installs them. The filters are global to the process,
so only entry points import it, never the mmdgms package.
"""
import warnings

# mmengine 0.10.7 imports pkg_resources whenever it resolves an 'mmdet::'
# config path (mmengine/utils/package_utils.py, which also reloads it), and
# setuptools 80.10.2 issues this UserWarning on every such import. Users
# cannot act on it, because tools/setup_env.sh already pins setuptools < 81
# to keep pkg_resources for mmengine. Other warnings are left as they are.
warnings.filterwarnings(
    'ignore',
    message='pkg_resources is deprecated as an API',
    category=UserWarning)
