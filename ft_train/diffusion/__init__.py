"""The noise process: flow-matching training loss (and, later, the sampler)."""

from .flow_matching import FlowMatchingLoss, LossOutput, first_frame_mask, shift_sigma, step_generator

__all__ = ["FlowMatchingLoss", "LossOutput", "first_frame_mask", "shift_sigma", "step_generator"]
