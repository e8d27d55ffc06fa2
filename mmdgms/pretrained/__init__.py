from .mobilenet_v2 import (convert_mobilenet_v2_file,
                           convert_torchvision_mobilenet_v2,
                           ensure_mobilenet_v2_checkpoint,
                           fetch_mobilenet_v2_imagenet,
                           load_torchvision_state_dict, save_mmdet_checkpoint)

__all__ = [
    'convert_mobilenet_v2_file', 'convert_torchvision_mobilenet_v2',
    'ensure_mobilenet_v2_checkpoint', 'fetch_mobilenet_v2_imagenet',
    'load_torchvision_state_dict', 'save_mmdet_checkpoint'
]
