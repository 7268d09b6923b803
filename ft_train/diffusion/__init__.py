"""The noise process: flow-matching training loss and the guided Euler sampler."""

from .flow_matching import FlowMatchingLoss, LossOutput, first_frame_mask, shift_sigma, step_generator
from .sampler import FlowMatchSampler, GuidancePass, guidance_passes, sampling_sigmas

__all__ = [
    "FlowMatchSampler",
    "FlowMatchingLoss",
    "GuidancePass",
    "LossOutput",
    "first_frame_mask",
    "guidance_passes",
    "sampling_sigmas",
    "shift_sigma",
    "step_generator",
]
