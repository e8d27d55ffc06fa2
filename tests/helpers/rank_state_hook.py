"""A hook for the distributed tests: each rank dumps its state."""
import os.path as osp

import torch
from mmengine.dist import get_rank
from mmengine.hooks import Hook
from mmengine.model import is_model_wrapper
from mmengine.registry import HOOKS


@HOOKS.register_module()
class RankStateDumpHook(Hook):
    """Write ``rank<N>.pth`` to the work dir when training ends.

    The file contains the model's state dict, the name of the model wrapper and
    how many checkpoints this rank has saved. ``before_save_checkpoint`` runs
    inside ``Runner.save_checkpoint``, so it counts the writes of this rank.
    """

    priority = 'LOWEST'

    def __init__(self):
        self.saved_checkpoints = 0

    def before_save_checkpoint(self, runner, checkpoint):
        self.saved_checkpoints += 1

    def after_train(self, runner):
        model = runner.model
        wrapper = type(model).__name__
        if is_model_wrapper(model):
            model = model.module
        state = dict(state_dict={
            k: v.detach().clone()
            for k, v in model.state_dict().items()
        },
                     wrapper=wrapper,
                     saved_checkpoints=self.saved_checkpoints)
        torch.save(state, osp.join(runner.work_dir, f'rank{get_rank()}.pth'))
