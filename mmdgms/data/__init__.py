from .pypi_cache import WheelDownloadError, default_cache_dir, download_wheel
from .trees import (TREE_CATEGORY, fetch_deepforest_wheel,
                    prepare_tree_dataset, tile_origins)

__all__ = [
    'TREE_CATEGORY', 'WheelDownloadError', 'default_cache_dir',
    'download_wheel', 'fetch_deepforest_wheel', 'prepare_tree_dataset',
    'tile_origins'
]
