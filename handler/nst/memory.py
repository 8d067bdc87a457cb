"""Admission control: estimate one optimization's peak memory before allocating it.

The estimate counts what autograd keeps for the backward pass of one step
(every post-ReLU activation up to conv5_1, pool indices, the input) plus the
transient gradients of the largest layers, the L-BFGS history and the style
images' feature passes, with a safety factor. It is analytic: on a GPU,
tests/core/test_memory.py checks it against torch.cuda.max_memory_allocated.
"""
from __future__ import annotations

import psutil
import torch

from .config import Params
from .optimize import lbfgs_history, lbfgs_pair_bytes
from .vgg import _CONVS

FLOAT = 4  # bytes; the float32 steps are the largest
SAFETY = 1.5  # allocator rounding, fragmentation, temporaries not modelled
BASE = 64 * 1024 * 1024  # per request: targets, Grams, buffers


def activation_elements_per_pixel() -> float:
    """Elements autograd stores per input pixel for one step through VGG19 to conv5_1."""
    stored = 3.0  # the normalized input
    for block, _, _, cout, _ in _CONVS:
        scale = 4.0 ** -(block - 1)  # 2x2 pooling between blocks
        stored += 2 * cout * scale  # conv output (ReLU input) and ReLU output
    for block, channels in ((1, 64), (2, 128), (3, 256), (4, 512)):  # pool indices (int64 = 2 floats)
        stored += 2 * channels * 4.0 ** -block
    return stored


def estimate_bytes(height: int, width: int, style_pixels: int, params: Params) -> int:
    """Peak bytes of one request at height x width with styles of `style_pixels` in total."""
    pixels = height * width
    step = activation_elements_per_pixel() * pixels * FLOAT
    grads = 2 * 64 * pixels * FLOAT  # backward holds about two conv1 gradients at once
    history = 0
    if params.optimizer == "lbfgs":
        history = lbfgs_history(pixels) * lbfgs_pair_bytes(pixels)
    styles = 2 * 64 * style_pixels * FLOAT  # target pass under no_grad: one layer pair at a time
    return int(SAFETY * max(step + grads + history, styles) + BASE)


# Allocation failures that torch raises as a plain RuntimeError, not
# torch.OutOfMemoryError: c10's host allocator (torch 2.14; older releases said
# "not enough memory"), a raw cudaErrorMemoryAllocation from C10_CUDA_CHECK
# (a library handle or stream created on a full GPU), and cuBLAS / cuDNN
# failing to get a workspace.
_OOM_TEXT = (
    "DefaultCPUAllocator: can't allocate memory",
    "DefaultCPUAllocator: not enough memory",
    "CUDA error: out of memory",
    "CUBLAS_STATUS_ALLOC_FAILED",
    "CUDNN_STATUS_ALLOC_FAILED",
)


def is_out_of_memory(exc: BaseException) -> bool:
    """True for every way an allocation failure surfaces: CUDA's
    OutOfMemoryError, Python's and numpy's MemoryError, and the RuntimeErrors
    above, which are otherwise indistinguishable from a bug."""
    if isinstance(exc, (torch.OutOfMemoryError, MemoryError)):
        return True
    return isinstance(exc, RuntimeError) and any(text in str(exc) for text in _OOM_TEXT)


def available_bytes(device: torch.device) -> int:
    """What the device can still give: free GPU memory plus PyTorch's cached
    blocks, or the host's available memory."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    return psutil.virtual_memory().available
