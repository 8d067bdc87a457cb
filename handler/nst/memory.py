"""Admission control: estimate one optimization's peak memory before allocating it.

The estimate counts what autograd keeps for the backward pass of one float32
step (each ReLU output, which is also the next conv's or pool's input, the
pool indices and outputs, the input and its clamp), the largest transient (a
conv output before its ReLU), the L-BFGS history and the style images' feature
passes, with a small safety factor. It is analytic: tests/core/test_memory.py
checks the saved-tensor count against autograd's own hooks on the CPU, and the
whole estimate against torch.cuda.max_memory_allocated on a GPU (within 1.3x
above the measured peak, never below it).
"""
from __future__ import annotations

import gc
from typing import Sequence

import psutil
import torch

from .config import GRAM_LOWP_DEVICES, RGB_PAD_CHANNELS, RGB_PAD_DEVICES, Params
from .lbfgs import history_pairs, pair_bytes
from .vgg import CONVS

FLOAT = 4  # bytes; the float32 steps are the largest
HALF = 2  # bytes of a saved activation where every step runs VGG in a 2-byte dtype (float16 on a GPU)
SAFETY = 1.1  # allocator rounding and block splitting; cuDNN's choice of kernels
BASE = 64 * 1024 * 1024  # per request: targets, Grams, buffers
# On a GPU, measured with torch.cuda.max_memory_allocated on an H200 (torch
# 2.11, channels-last passes, CUDA graphs; docs/PERFORMANCE.md) at 512x512,
# 1024x768 and 2048x1536: the peak is the saved tensors below plus about 210
# more float32 values per pixel (gradients, cuDNN's workspaces sized by the
# image, the graph's pool), and about 0.2 GiB that does not grow with the
# image (cuBLAS / cuDNN workspaces). The CPU allocator keeps none of these.
GPU_TRANSIENT_PER_PIXEL = 210.0
GPU_BASE = 256 * 1024 * 1024


def saved_bytes_per_pixel(feature_bytes: int = FLOAT) -> float:
    """Bytes autograd saves per input pixel for one step through VGG19 to
    conv5_1, with features of `feature_bytes` each (pool indices are int64
    whatever the features' dtype)."""
    stored = 2 * 3.0 * FLOAT  # the image and its clamped, normalized copy, float32 both
    for block, index, cin, cout, _ in CONVS:
        scale = 4.0 ** -(block - 1)  # 2x2 pooling between blocks
        if block > 1 and index == 1:  # the pool that ended the previous block, of cin channels
            stored += cin * scale * feature_bytes  # its output, this conv's saved input
            stored += cin * scale * 8  # its int64 indices
        stored += cout * scale * feature_bytes  # the ReLU output (saved by the ReLU and the next layer alike)
    stored += 512 / 64 * FLOAT  # the content loss's float32 difference at conv4_2
    return stored


def saved_elements_per_pixel() -> float:
    """saved_bytes_per_pixel of float32 steps, in float32 elements."""
    return saved_bytes_per_pixel(FLOAT) / FLOAT


def float32_copies_per_pixel(device_type: str = "cpu") -> float:
    """Elements per input pixel of the float32 copies that the losses make
    of low-precision features and autograd saves (losses.gram,
    losses.content_loss): conv4_2's, and every style layer's (conv1_1 ..
    conv5_1). Where the Grams read the 16-bit features themselves
    (GRAM_LOWP_DEVICES) there are no copies, but the backward of conv1_1's
    Gram, the largest, writes a float32 product of its size (and the
    features they save are the ReLU outputs already counted): conv1_1's
    copy stays in the count, the deeper layers' go. On an H100 (bench/
    gpu_results_h100.json, run 4) the float16 peaks grew by 1638 bytes per
    pixel from 1024x768 to 2048x1536 beyond the history, where they grew by
    about 1880 with the copies (run 2): about 240 less, those deeper
    layers' 232."""
    lowp_grams = device_type in GRAM_LOWP_DEVICES
    copies = 0.0
    for block, index, _, cout, _ in CONVS:
        if (index == 1 and (block == 1 or not lowp_grams)) or (block, index) == (4, 2):
            copies += cout * 4.0 ** -(block - 1)
    return copies


def padded_input_bytes_per_pixel(device_type: str, feature_bytes: int) -> float:
    """conv1_1's saved input where the image is padded to RGB_PAD_CHANNELS
    channels on this device type (RGB_PAD_DEVICES), in the steps' dtype."""
    return RGB_PAD_CHANNELS * feature_bytes if device_type in RGB_PAD_DEVICES else 0.0


def transient_elements_per_pixel(device_type: str = "cpu") -> float:
    """What is alive beside the saved tensors at the peak: on a CPU, conv1's
    output before its ReLU, and during backward two conv1-sized gradients; on a
    GPU, the measured excess (GPU_TRANSIENT_PER_PIXEL)."""
    return GPU_TRANSIENT_PER_PIXEL if device_type == "cuda" else 2 * 64.0


def estimate_bytes(height: int, width: int, style_pixels: int, params: Params, device_type: str = "cpu",
                   step_dtypes: Sequence[torch.dtype] = (torch.float32,)) -> int:
    """Peak bytes of one request at height x width with styles of `style_pixels`
    in total, on a `device_type` ("cpu" or "cuda") worker whose steps run VGG
    in `step_dtypes` (nst.optimize.step_dtypes decides; the float32 default
    is the largest)."""
    pixels = height * width
    # Where every step is float16 the saved activations and the transients
    # are half the size, but the losses' float32 copies of the features are
    # saved beside them (fewer with GRAM_LOWP_DEVICES: float32_copies_per_pixel).
    # On an H100 (bench/gpu_results_h100.json, run 2, float32 Gram copies)
    # float16 steps' peaks grew by about 1880 bytes per pixel from 1024x768
    # to 2048x1536 beyond the L-BFGS history: 1456 of them saved (this
    # count), about 420 (210 half-size values) transient.
    if all(dtype.itemsize == 2 for dtype in step_dtypes):
        element = HALF
        saved = saved_bytes_per_pixel(HALF) + float32_copies_per_pixel(device_type) * FLOAT
    else:
        element = FLOAT
        saved = saved_bytes_per_pixel(FLOAT)
    saved += padded_input_bytes_per_pixel(device_type, element)
    step = (saved + transient_elements_per_pixel(device_type) * element) * pixels
    history = 0
    if params.optimizer == "lbfgs":
        history = history_pairs(pixels, device_type) * pair_bytes(pixels, device_type)
    styles = 2 * 64 * style_pixels * FLOAT  # target pass under no_grad: one layer pair at a time
    return int(SAFETY * max(step + history, styles) + (GPU_BASE if device_type == "cuda" else BASE))


def shared_pool_bytes(height: int, width: int) -> int:
    """What a kept optimization's bf16 graph pool holds while its first
    request runs its float32 steps (see KEEP_PROGRAMS_MAX_PIXELS): modelled,
    not measured, as the float32 step's activations and transients at half
    the width."""
    pixels = height * width
    return int(SAFETY * (saved_elements_per_pixel() + GPU_TRANSIENT_PER_PIXEL) * pixels * FLOAT / 2)


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


def release(device) -> None:
    """Give back what a failed allocation left: collected tensors to the
    allocator, the allocator's cache to the device. On the host, glibc keeps
    freed pages of a large failed request in its heap; trimming hands them
    back, so the worker's resident size returns to where it was."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    elif _LIBC is not None:
        _LIBC.malloc_trim(0)


def _libc():
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc if hasattr(libc, "malloc_trim") else None  # glibc only
    except OSError:
        return None


_LIBC = _libc()


def is_out_of_memory(exc: BaseException) -> bool:
    """True for every way an allocation failure surfaces: CUDA's
    OutOfMemoryError, Python's and numpy's MemoryError, and the RuntimeErrors
    above, which are otherwise indistinguishable from a bug."""
    if isinstance(exc, (torch.OutOfMemoryError, MemoryError)):
        return True
    return isinstance(exc, RuntimeError) and any(text in str(exc) for text in _OOM_TEXT)


def total_bytes(device: torch.device) -> int:
    """The device's whole memory: the GPU's, or the host's."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    return psutil.virtual_memory().total


def available_bytes(device: torch.device) -> int:
    """What the device can still give: free GPU memory plus PyTorch's cached
    blocks, or the host's available memory."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    return psutil.virtual_memory().available
