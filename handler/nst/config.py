"""Every tunable of the product in one place: server limits and request defaults.

`Limits` bounds what one request may ask for (the server's side of the contract);
`Params` is one request's settings after validation. The defaults of `Params`
are the fast preset; `SEED_PRESET` holds the reference recipe's values.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Mapping

# The reference recipe's style layers and their weights (the tutorial names the
# conv layers, but the activations it really reads are post-ReLU: see vgg.py).
RECIPE_STYLE_LAYERS: Mapping[str, float] = {
    "conv1_1": 1.0,
    "conv2_1": 0.75,
    "conv3_1": 0.2,
    "conv4_1": 0.2,
    "conv5_1": 0.2,
}
RECIPE_CONTENT_LAYER = "conv4_2"


# Seconds a request may run past its time budget: its last step may end up
# to LAST_STEP_OVERRUN_S past it, then the result is scored, encoded and
# sent. The budget is checked after every step, and a step that would end
# past it (or, the last, past LAST_STEP_OVERRUN_S after it) is not started,
# judged by the request's shortest step so far: on the 2-core CPU (one run)
# a step of a 4-row batch at 1024x768 took about 42 s, longer than this
# whole margin, and TorchServe kills a worker that answers past
# responseTimeout.
RESPONSE_MARGIN_S = 30
LAST_STEP_OVERRUN_S = RESPONSE_MARGIN_S / 2
# A running request that cannot finish its steps before its deadline (the
# time budget, or the client's timeout_s / deadline) at the pace of its steps
# so far is stopped at the next progress record, with a 504 saying how many
# steps would fit, instead of holding its worker until the deadline for an
# answer that would be a 504 anyway. On the 2-core CPU (one run) a default
# request at max_size 1024 (1024x768: bf16 steps about 4.4 s, float32 ones
# 9-10 s) stopped at step 80 after 470 s, not at the 540 s budget: until
# step 60 its pace was bf16's, which does not foresee the slower float32
# steps.
# "Cannot": the steps left would need more than DEADLINE_SLACK times the
# time left, and DEADLINE_SLACK_S more than it. The pace is measured from
# the first progress record of the steps' current dtype on (the stretch
# before it holds the slow first step: oneDNN's or cuDNN's set-up, a CUDA
# graph's capture), never from a single stretch. Steps that get faster
# later (a neighbouring worker going idle on the same cores) could still
# have made it: the slack keeps such close calls running to the deadline.
DEADLINE_SLACK = 1.25
DEADLINE_SLACK_S = 1.0


# A URL input's name lookup (getaddrinfo: no timeout, not interruptible) runs
# on a thread its download waits for only until its url_total_timeout_s;
# a lookup it gave up on runs on until the system resolver gives up (30 s
# and more). With this many such lookups still running, a URL input is
# refused (503) without starting another, so a name server that never
# answers cannot pile up threads in the worker.
MAX_PENDING_LOOKUPS = 8
# Longest URL input, in characters; longer ones are refused (400) unread.
MAX_URL_CHARS = 2048


# conv5_1 follows four 2x2 poolings: a side under 2**4 px leaves it no pixel
# (a VGG pass then fails, a 500), so no configuration may admit one.
VGG_MIN_SIDE = 16


@dataclass(frozen=True)
class Limits:
    """Server-side bounds. Overridable from the model-config YAML (`limits:` key)."""

    max_steps: int = 3000  # the recipe needs 2000; more is never useful
    max_size: int = 1024  # longest output side, px, on a CPU: time grows with H*W
    max_size_gpu: int = 2048  # the same on a GPU, where memory allows it (admission control checks)
    min_input_side: int = VGG_MIN_SIDE  # px; at least VGG_MIN_SIDE
    max_input_pixels: int = 50_000_000  # checked from the header, before decoding
    max_input_bytes: int = 25 * 1024 * 1024  # one encoded image
    # A progressive JPEG's decode cost is scans x pixels; encoders write about
    # 10 scans, libjpeg-turbo's own fuzzing refuses more than 500. 100 scans of
    # the largest allowed image decode in about 2 s on one core.
    max_jpeg_scans: int = 100
    max_styles: int = 4  # style, style_2 .. style_4
    # The whole request from when the worker takes it, URL downloads included;
    # at least RESPONSE_MARGIN_S below responseTimeout (600 s) so no worker is killed.
    time_budget_s: float = 540.0
    progress_every: int = 10  # steps between streamed progress records
    # On a CPU also a record once this many seconds have passed since the last
    # (by steps alone where it is larger than any step): at 1024 px ten float32 steps take about 100 s there, longer
    # than the idle timeout of many proxies and load balancers (often 60 s),
    # which would cut a stream that is working. Reading the loss costs a CPU
    # nothing; on a GPU it is a host sync, so records go by steps alone there.
    progress_every_s: float = 15.0
    # Intra-op threads of a CPU worker; 0: the cores this process may run on,
    # shared among TorchServe's worker processes (counted at each call, so a
    # scale up or down is followed). Each of N workers running as many threads
    # as there are cores oversubscribes the machine, and their OpenMP threads
    # spin against each other: with 2 workers on 2 cores, 4 requests (96 px,
    # 60 steps) took 28 s against 5.6 s at one thread each (one run).
    cpu_threads: int = 0
    # Below config.properties' max_response_size (64 MiB): TorchServe kills a
    # worker whose response is larger, so the handler refuses first.
    max_response_bytes: int = 60 * 1024 * 1024
    # Admission control: a request whose estimated peak memory (nst.memory)
    # exceeds this many MiB is refused (507) before anything is allocated.
    # 0 = whatever the device has free at that moment.
    memory_budget_mb: int = 0
    allow_urls: bool = False  # fetch content_url / style_url (public http(s) addresses only)
    url_max_redirects: int = 3  # each hop re-checked
    url_connect_timeout_s: float = 3.0
    url_read_timeout_s: float = 5.0  # per socket read
    url_total_timeout_s: float = 15.0  # whole download, however it trickles

    def for_device(self, device_type: str) -> "Limits":
        """The limits a worker on `device_type` ("cpu", "cuda") applies: the
        largest `max_size` follows the device."""
        if device_type == "cuda":
            return dataclasses.replace(self, max_size=self.max_size_gpu)
        return self

    def check_response_timeout(self, response_timeout_s: float) -> None:
        """Refuse a budget that the server's response timeout would cut short:
        the frontend kills a worker that answers late, mid-request."""
        if self.time_budget_s > response_timeout_s - RESPONSE_MARGIN_S:
            raise ValueError(
                f"limits.time_budget_s ({self.time_budget_s:g} s) must be at least {RESPONSE_MARGIN_S} s below "
                f"responseTimeout ({response_timeout_s:g} s), or slow requests kill the worker"
            )

    @classmethod
    def from_mapping(cls, raw: Mapping[str, Any] | None) -> "Limits":
        """Build from the YAML's `limits:` mapping; unknown keys are an error."""
        if not raw:
            return cls()
        names = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(raw) - set(names))
        if unknown:
            raise ValueError(f"unknown limits in model config: {', '.join(unknown)}")
        values = {}
        defaults = cls()
        for key, value in raw.items():
            kind = type(getattr(defaults, key))
            if kind is bool:
                if not isinstance(value, bool):
                    raise ValueError(f"limits.{key} must be true or false")
            elif kind is int:
                lowest = 0 if getattr(defaults, key) == 0 else 1  # 0 means "automatic" where it is the default
                if isinstance(value, bool) or not isinstance(value, int) or value < lowest:
                    raise ValueError(f"limits.{key} must be an integer >= {lowest}")
            else:
                if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
                    raise ValueError(f"limits.{key} must be a positive number")
                value = float(value)
            values[key] = value
        limits = cls(**values)
        if limits.min_input_side < VGG_MIN_SIDE:
            raise ValueError(f"limits.min_input_side must be at least {VGG_MIN_SIDE}: VGG pools four times "
                             "before conv5_1")
        for key in ("max_size", "max_size_gpu"):
            if getattr(limits, key) < limits.min_input_side:
                raise ValueError(f"limits.{key} must be at least limits.min_input_side ({limits.min_input_side})")
        return limits


@dataclass(frozen=True)
class Params:
    """One request's settings. Defaults = the `fast` preset."""

    preset: str = "fast"  # fast | seed: a preset only lays defaults over these (SEED_PRESET)
    # What is optimized. pixels: [0,1] RGB that the objective sees clamped (the
    # image scored is the image delivered), low-precision VGG passes
    # (LOWP_DTYPE: bf16 for the first LOWP_STEPS on a CPU, float16 on every
    # step on a GPU). normalized: ImageNet-normalized values, unclamped, float32
    # throughout, the style resized to the content's exact shape at
    # style_scale 1 (the recipe's pipeline; its pixels clip on delivery).
    space: str = "pixels"  # pixels | normalized
    steps: int = 100  # optimizer steps (L-BFGS or Adam); each is one forward+backward
    max_size: int = 512  # longest output side, px (never upscales)
    optimizer: str = "lbfgs"  # lbfgs | adam
    lr: float = 1.0  # L-BFGS step scale; Adam's default is FAST_ADAM_LR (below)
    content_weight: float = 1.0  # alpha
    style_weight: float = 1e6  # beta
    style_layer_weights: Mapping[str, float] = field(
        default_factory=lambda: dict(RECIPE_STYLE_LAYERS)
    )
    init: str = "content"  # content | noise
    seed: int | None = None  # the noise of init=noise (the only randomness)
    preserve_color: bool = False  # keep the content image's colors (luminance transfer)
    style_blend: tuple[float, ...] | None = None  # weights of the style images, in order
    style_scale: float = 1.0  # style size relative to the content's longest side
    tv_weight: float = 0.0  # total-variation penalty
    pooling: str = "max"  # max | avg
    format: str = "png"  # png | jpeg | webp
    quality: int = 90  # jpeg / webp only
    # The client's own deadlines; the server's time_budget_s still applies.
    timeout_s: float | None = None  # seconds from when a worker takes the request
    deadline: float | None = None  # Unix time; a request still queued past it is dropped unstarted

    @property
    def normalized_space(self) -> bool:
        """space=normalized: the recipe's optimization space (see `space`)."""
        return self.space == "normalized"


# What `preset=seed` changes relative to the dataclass defaults. Fields a request
# sets explicitly win over the preset.
SEED_PRESET: Mapping[str, Any] = {
    "space": "normalized",
    "steps": 2000,
    "max_size": 400,
    "optimizer": "adam",
    "lr": 0.003,
    "content_weight": 1.0,
    "style_weight": 1e6,
    "init": "content",
    "pooling": "max",
    "tv_weight": 0.0,
}
# Adam's learning rate when the fast preset is asked for Adam: [0,1] pixels
# move far less per unit of lr than L-BFGS's scaled steps.
FAST_ADAM_LR = 0.02

# The fast preset's VGG passes run in low precision where the hardware has
# it, per device type ("float16", "bfloat16"; absent: float32 throughout).
# Grams and losses stay float32 (losses.py). `space=normalized` is float32.
# - CPU, bf16 (AVX512-BF16): 1.9x per step on this project's CPU. bf16's 8
#   mantissa bits stall near the optimum, so only the first LOWP_STEPS steps
#   use it and later ones run in float32. (The CPU has no fast float16.)
# - GPU, float16 on every step: its 11 mantissa bits do not stall. On an H100
#   (bench/gpu_results_h100.json) on every corpus pair its loss after 100 and
#   300 steps was at worst 1.07x and 1.04x that of bf16-then-float32 (lower on
#   most), where bf16 throughout ended up to 6x higher; at 512x384 a step took
#   2.11 ms against a float32 step's 2.77, and 100 steps reached loss 7.0
#   against 10.3. Its gradients are scaled (GRAD_SCALE_*): float16 overflows
#   past 65504, where bf16 and float32 do not.
LOWP_DTYPE: Mapping[str, str] = {"cuda": "float16", "cpu": "bfloat16"}
LOWP_STEPS = 60  # bf16 steps before float32; 0 = no bf16 step
# float16 gradients are computed from the loss times a per-image scale and
# divided by it in float32 (loss scaling, as torch.amp.GradScaler does, but
# on the device with no host sync): a step whose gradient is not finite is
# skipped (the image and the L-BFGS history stay) and divides the scale by
# GRAD_SCALE_BACKOFF, and GRAD_SCALE_GROWTH_STEPS finite steps in a row
# double it, up to GRAD_SCALE_MAX, so small gradients keep float16's
# precision. The backoff is steep (GradScaler halves): a gradient 2^20 past
# the range costs 5 skipped steps, not 20, and a scale up to 16x too small
# only loses the lowest 4 of float16's 40 binary orders of magnitude. At the
# recipe's weights with the offline random VGG no step overflowed at scale 1
# (four corpus pairs, float16 forced on the CPU, 60 steps); at style_weight
# 1e12 (or with weights whose features run larger) an unscaled float16 step
# overflows at once and the image is lost.
GRAD_SCALE_INIT = 1.0
GRAD_SCALE_BACKOFF = 16.0
GRAD_SCALE_GROWTH_STEPS = 50
GRAD_SCALE_MAX = 2.0 ** 24
GRAD_SCALE_MIN = 2.0 ** -64
# L-BFGS history pairs, capped so the history stays under LBFGS_MEMORY bytes
# on large images. On the 96x72 corpus at step bound 0.35
# (bench/sweep_lbfgs_history.json) 20 pairs reach the recipe's loss in the
# same steps as 50 (182 against 183 for the 12 pairs), 10 in 198; 50 gives the
# best 100-step images (worst 0.231x the recipe's loss, 0.255x with 20, 0.305x
# with 10). A GPU step reads the whole history twice: on an H100 a float32 step
# at 512x512 took 3.25 ms with 20 pairs against 3.41 with 50, too little to
# give up the better images.
LBFGS_HISTORY = 50
# The history's bytes per image: a larger image keeps fewer pairs, but never
# fewer than LBFGS_MIN_HISTORY (with a handful, L-BFGS comes close to plain
# gradient descent; at 2048x2048, the largest output, 5 float32 pairs take 503 MB).
LBFGS_MEMORY = 512 * 1024 * 1024
LBFGS_MIN_HISTORY = 5
# The dtype the L-BFGS history (S and Y, 2 x LBFGS_HISTORY image-sized
# vectors) is stored in, per device type ("float32" or "bfloat16"; absent:
# float32). A step reads the history twice (about 0.16 ms of an H100's float32
# step went with 30 of the 50 pairs, above); bf16 halves those bytes. Its
# products are still accumulated in float32, and on a GPU float32 ones
# already round their inputs to TF32's 10-bit mantissa; bf16 keeps 7 bits.
# - GPU, bf16: part of the engine that an H100 run nominated (run 3,
#   bench/gpu_engine_h100.md, with LBFGS_COMPILE, GRAM_LOWP_DEVICES and
#   RGB_PAD_DEVICES below): alone it took
#   the step at 512x512 from 2.53 to 2.50 ms (100-step loss 1.055x), with the
#   update compiled to 2.18 ms (0.957x).
# - CPU, float32: not measured for speed here. On the CPU corpus
#   (bench/sweep_lbfgs_history_dtype.json) bf16 reached the recipe's loss in
#   the same steps (183 for the 12 pairs, each pair within one step) and its
#   100-step images were 0.83x-1.38x float32's loss (worst pair 0.227x the
#   recipe's against 0.231x); the CPU's speed figures (make bench) are
#   float32's.
LBFGS_HISTORY_DTYPE: Mapping[str, str] = {"cuda": "bfloat16", "cpu": "float32"}
# Longest move of any pixel in one L-BFGS step, in the optimized variable's
# units: [0,1] pixels (the fast preset, where it was chosen), or normalized
# values with space=normalized (std about 0.23, so 0.35 there is about 0.08
# of the [0,1] range, a tighter bound, not tuned). At the recipe's
# weights the gradients are in the hundreds: an unbounded first step threw every
# pixel out of range and the optimizer stalled there (issue #11). Chosen on the
# quality corpus at 96x72 (bench/sweep.py, bench/sweep_lbfgs_max_move.json: all
# 12 pairs, stored recipe targets, 0.15 to 0.5): from 0.3 to 0.5 every pair
# passes the recipe's loss at least 82x sooner than the recipe (178-193 steps
# for the 12 pairs together) and every 100-step image is at most 0.23x the
# recipe's loss; 0.35 is the middle of that plateau, median 274x. 0.25 (the
# value chosen at 64x48) left the noise style at 86 steps (worst 31x) and its
# 100-step image at 0.46x; 0.15 crawled on painting_painting (105 steps). On
# the 170x128 Tübingen pair 0.35 needed 26 steps in the last make bench
# (bench/results.json) against 0.25's 24 in an earlier one. A plain
# bound on the first step only left the noise style's image at 0.51x.
LBFGS_MAX_MOVE = 0.35
# On a GPU, the fast preset's L-BFGS steps are captured in a CUDA graph once
# per image shape and dtype, after one eager step, and replayed: a step is
# hundreds of small kernels, which otherwise leave the GPU waiting on launches.
CUDA_GRAPHS = True
# Adam's steps (preset=seed, and optimizer=adam) captured in a CUDA graph as
# L-BFGS's are, with Adam's capturable state. On an H100 (run 3,
# bench/gpu_engine_h100.md, 512x384) preset=seed took 0.89x the recipe's
# time per step eager, 0.53x in a graph, 0.40x in a graph with its loss
# compiled (WARM_UP_PRESETS), each 300-step image at the eager one's loss
# (1.000x); shipped since, runs 4 and 5 measured 0.35x and 0.38x
# (bench/gpu_results_h100.json).
ADAM_CUDA_GRAPHS = True
# On a GPU, the fast preset's loss (VGG pass, Grams, losses) and its backward
# go through torch.compile: fused kernels instead of one per elementwise op.
# Compiling takes seconds per image shape and dtype, so requests never compile
# (a shape not compiled yet runs uncompiled, still in a CUDA graph): shapes are
# compiled by `nst.optimize.warm_up`, which the handler runs at worker start.
# Not on a CPU: on the 2-core test machine (torch 2.14.1, 170x128, a one-off
# probe) compiled steps were slower than eager ones, bf16 138 ms against
# 113-128 and float32 231 against 218-223, after 30 s and 18 s of compiling
# (oneDNN runs the convolutions either way).
COMPILE = True
# On a GPU, the L-BFGS update that follows each backward pass (unscaling a
# float16 gradient, the history update, the direction, the bounded step;
# about a hundred elementwise and small kernels on the image-sized vectors)
# compiled by torch.compile as the loss is, under the same policy: only
# `warm_up` compiles, a request runs compiled code where its guards match
# and eager code otherwise. Part of the engine H100 run 3 nominated
# (bench/gpu_engine_h100.md; with LBFGS_HISTORY_DTYPE's bf16, GRAM_LOWP_DEVICES
# and RGB_PAD_DEVICES): the default step at 512x512 took 1.90 ms against 2.53
# without the four, its 100-step loss 0.930x, the corpus' worst pair 1.004x.
# Alone it took the step to 2.25 ms (loss 0.995x). Run 4 measured the four
# shipped in a fresh process: 1.90 ms (bench/gpu_results_h100.json).
LBFGS_COMPILE = True
# Inductor options of that compiled update. emulate_precision_casts: a cast to
# bf16 and straight back to float32 really rounds (inductor drops such pairs
# otherwise), so a bf16 history's curvature test reads the pair as it will be
# stored (nst.lbfgs.update_history). Without it the compiled update kept
# pairs whose stored s.y is not positive (200 of 200 near-orthogonal pairs
# took a slot on the CPU's inductor, against 105 eager) and took gamma from
# the unrounded pair (2.5e-9 where eager kept 1.0). With it, H100 run 5 took
# the default step at 512x512 in 1.83 ms (run 4, without: 1.90), and the GPU
# compile test kept the compiled update's 60-step loss within 7% of eager.
LBFGS_COMPILE_OPTIONS: Mapping[str, bool] = {"emulate_precision_casts": True}
# On these device types the Gram matrices of 16-bit features (every
# fast-preset step on a GPU, LOWP_DTYPE) by matmuls that read the features in
# their own dtype and accumulate in float32 (nst.losses._LowpGram), where
# otherwise each style layer's features are first copied to float32. At 512x512
# the five style layers hold 32M values, so the copy writes 128 MB that the
# matmul reads back, and the backward reads that copy again: about 0.3 GB less
# memory traffic per step (reckoned from the layer shapes, not measured; an
# H100 moves about 3 GB per ms). The forward's numbers are the same (16-bit
# values are exact in float32, and TF32 keeps float16's bits); the backward
# rounds dG + dG^T to 16 bits, scaled to its range. The float32 copies were
# also kept for the backward: without them the H100's float16 peaks grew about
# 240 bytes per pixel less (nst.memory.float32_copies_per_pixel). On an H100
# (run 3, bench/gpu_engine_h100.md) alone it took the step at 512x512 from
# 2.53 to 2.25 ms, its 100-step loss 0.951x; it is part of the engine that run
# nominated (see LBFGS_COMPILE). A CPU has no such matmul: its stand-in makes
# the same float32 copy, so there it would only add the backward's rounding.
# Quality, in a one-off CPU probe (not in the repo; float16 forced on every
# step, as on a GPU, 100 steps, six corpus pairs at half size and the tiny
# one): 0.955x-1.029x the default's delivered loss, pair by pair.
GRAM_LOWP_DEVICES: tuple[str, ...] = ("cuda",)
# On these device types the Grams' backward is one matmul, F (dG + dG^T)
# (nst.losses._Gram), where autograd's bmm backward takes one per operand
# and adds them: half the Grams' backward work, and two fewer feature-sized
# float32 tensors written per style layer. The same numbers up to rounding
# (the sum's order). On the 2-core CPU (torch 2.14.1, with the bound below;
# the two ways interleaved, medians; a one-off probe, not in the repo)
# 100-step requests (bf16, then float32 steps) took 0.91x as long on the
# corpus' tiny pair (32x32) and photo_painting (96x72), 0.95x on the
# elongated one (256x32), six runs each, and a 26-step request on the
# 170x128 Tübingen pair 0.96x (four runs).
# Not on a GPU, where nothing has measured it: there the fast preset's
# float16 steps get this backward with GRAM_LOWP_DEVICES (its Function has
# it too), and preset=seed's float32 Grams would gain
# about 1.5% of a step by reckoning (0.3 GB less traffic at 512x384), below
# what bench/gpu.py's candidate rule can tell from noise (3%).
GRAM_ONE_PRODUCT_DEVICES: tuple[str, ...] = ("cpu",)
# ... for layers of at least this many pixels (h*w) only. dG + dG^T reads
# dG transposed, and on the CPU that costs about 0.3 ms for 512 channels
# (a 512x512 dG) whatever the layer's pixels, so where they are few it is
# dearer than the matmul it saves. Measured on the 2-core CPU (one Gram's
# forward and backward, bf16 features, medians of 36): one product took
# 1.06-1.27x autograd's time at 4 and 16 pixels, 0.91-1.14x at 64,
# 0.88-0.94x at 128, 0.50-0.58x at 4096, for 64 to 512 channels. Without
# this bound the tiny pair's 100-step requests took 1.07x as long, not 0.91x.
GRAM_ONE_PRODUCT_MIN_PIXELS = 128
# Float32 VGG passes (preset=seed's steps; every request's targets and final
# score) run channels-last on these device types, as low-precision ones
# always do; elsewhere in PyTorch's default layout (NCHW), which the
# tutorial's own loop uses. On a GPU TF32 convolutions run in both; on an
# H100 (run 3, bench/gpu_engine_h100.md) preset=seed's eager steps took
# 1.30x the recipe's time in NCHW against 0.89x channels-last, 0.64x against
# 0.53x in a CUDA graph; bench/gpu.py's engine_ablation measures it again
# (its seed way "nchw", with this set to ()).
FLOAT32_CHANNELS_LAST_DEVICES: tuple[str, ...] = ("cuda",)
# On these device types the image enters conv1_1 padded with zero channels to
# RGB_PAD_CHANNELS, and conv1_1's weights with zero input channels to match:
# the same convolution (every added product is zero), in a channel count
# that float16 tensor-core kernels are built for (a multiple of 8), where
# three channels may leave cuDNN a slower kernel for conv1_1's forward and
# for its input gradient (64 channels down to 3), each over the whole
# image. On an H100 (run 3, bench/gpu_engine_h100.md) alone it changed the
# step at 512x512 by 0.2% (2.53 ms), its 100-step loss 1.107x (rounding).
# It ships as part of the engine that run nominated as a whole (see
# LBFGS_COMPILE), where its own share does not show: that engine's 0.63 ms
# saving is the compiled update with the bf16 history's (0.35) plus the
# float16 Grams' (0.28). bench/gpu.py's engine_ablation measures the step
# without it (rgb_unpadded).
# The padded image is in the admission estimate (nst.memory). Quality, in
# the same CPU probe as GRAM_LOWP_DEVICES': 0.916x-1.023x the default's loss
# (rounding only: the same convolution).
RGB_PAD_DEVICES: tuple[str, ...] = ("cuda",)
RGB_PAD_CHANNELS = 8
# cuDNN autotuning (torch.backends.cudnn.benchmark) on a GPU worker: off.
# Measured on an H200 (bench/gpu_results_h200.json): it makes a step about 4%
# faster, but the first request of every new shape waits about 8 s while it
# tries kernels, and the trials take workspaces as large as the free memory
# (129 GiB at 1024x768), so admission control's estimate would mean nothing
# and a neighbouring request could run out of memory.
CUDNN_AUTOTUNE = False
# Optimizations a worker keeps between requests, per device type: the CUDA
# graphs of one image shape and structure, with the static tensors they read
# and write (the image, the targets, the L-BFGS history). A request of a kept
# shape loads its own image and targets into them and replays at once, where
# otherwise every request ran one eager step and one capture per dtype (on an
# H100, bench/gpu_results_h100.json, a 19-step request at 512x384 took 45 ms
# kept against 67 ms built).
# Least recently used first out. Never on the CPU, where there is no graph to
# keep and a kept L-BFGS history would only stay resident.
KEEP_PROGRAMS: Mapping[str, int] = {"cuda": 4}
# At most this fraction of the device's memory stays held by kept
# optimizations (charged at their admission estimate). They are dropped
# whenever a request would not fit beside them, so they never make a request
# refused; PyTorch's caching allocator keeps as much reserved after any
# request anyway.
KEEP_PROGRAMS_MEMORY = 0.25
# Only optimizations of at most this many pixels per image are kept. Where
# its steps use two dtypes (LOWP_DTYPE bfloat16 on a GPU; the shipped float16
# uses one), a kept one's graphs share a pool, so while its first request
# runs and captures its float32 steps, its bf16 steps' pool stays held beside
# them (one not kept frees it first): admission adds that pool
# (nst.memory.shared_pool_bytes) to such a request. The capture is a large
# part of a short request on a small image, where keeping gains most.
KEEP_PROGRAMS_MAX_PIXELS = 1024 * 1024
# Coarse-to-fine for large outputs: at or above this longest side (px) the
# fast preset first optimizes at half the size for COARSE_FRACTION of its
# steps (each costs a quarter), then carries the stylization, not the blurred
# image, to full size (content + upsampled (coarse result - coarse content))
# for the remaining steps. None = off: on an H100 (bench/gpu_results_h100.json,
# run 5, the shipped engine) 100 coarse-to-fine steps took 0.53 s against
# 0.76 s at 1024x768, and 1.77 against 2.68 s at 2048x1536, but ended at 3.5x
# and 1.7x single-scale's loss, and never reached single-scale's loss within
# the same 100 steps (an earlier run, before kept optimizations: 2.6x, 1.7x).
COARSE_TO_FINE_FROM: int | None = None
COARSE_FRACTION = 0.5
# False: one compiled program per image shape (each warmed up at worker start).
COMPILE_DYNAMIC = False
# How many compiled programs torch.compile keeps per function (its
# cache_size_limit, 8 by default; raised, never lowered): one per warmed-up
# shape, dtype and batch structure, so WARM_UP_SIZES x dtypes x presets, and
# past the limit a shape would silently run eager. Process-wide: it is
# torch._dynamo's own setting.
COMPILE_CACHE_SIZE = 64
# A batched optimization (TorchServe batching) steps each row's L-BFGS state
# on its own, or, on the device types listed here, all rows as one batched
# state (a few batched kernels per step instead of a few per row). Per row is
# bit for bit the row alone on the CPU, where a batched reduction rounded
# differently and the optimization amplified that to 2.7/255. On an H100
# (bench/gpu_results_h100.json, 8 rows against 1) one state served 1.25x at
# 256 px against 1.32x per row and 0.90x against 1.22x at 512 px, 3.48x
# against 2.24x only at 128 px: none listed.
LBFGS_ONE_STATE_DEVICES: tuple[str, ...] = ()  # device types, e.g. ("cuda",)
# Smallest output (pixels) that shares a batched optimization, per device
# type; None = rows never share one there (each runs alone, in the same call).
# Issue #12 allows a batched row 2/255 (mean) from the same request alone. On
# the CPU a row is bit for bit itself. On an H100 the batched kernels' other
# rounding, amplified by the optimization, moved rows of noise images up to
# 0.94/255 at 256x192 in one probe (bench/gpu_batch_equality_h100.json) but
# 2.4/255 at 256x192 with other styles in the GPU test, 3/255 at 128x96 and
# 9/255 at 40x32, whether the convolutions ran batched or image by image, in
# bf16 or float32: no size keeps every row within 2/255, so a GPU does not
# share optimizations until its kernels are made batch-invariant.
BATCH_MIN_PIXELS: Mapping[str, int | None] = {"cuda": None}
# Device types where a shared optimization evaluates its objective one row at
# a time (nst.losses.Objective): the CPU's kernels round differently with the
# batch's size (oneDNN's convolutions moved a batched row 2.7/255 from its
# image alone; the Grams' matmuls and the losses' means, split across threads
# by that size, 26/255 in 40 steps); one row at a time, each is bit for bit
# itself (two CPU cores gain nothing from larger products).
ROW_BY_ROW_DEVICES: tuple[str, ...] = ("cpu",)
# Output shapes (width, height) a GPU worker compiles at start: the default
# max_size (512) at the commonest aspect ratios. The model config's
# `warm_up_sizes` replaces the list ("WxH" strings; [] compiles nothing).
WARM_UP_SIZES = ((512, 512), (512, 384), (384, 512))
# Presets whose loss a GPU worker compiles at start: the fast preset (the
# default) at the sizes as listed, another at each fit to its own max_size,
# the shapes its requests come out at by default (preset=seed's 400 px:
# 400x400, 400x300, 300x400). The model config's `warm_up_presets` replaces
# the list. preset=seed too by default: on an H100 (run 3,
# bench/gpu_engine_h100.md) compiling its loss took its steps (in a CUDA
# graph, ADAM_CUDA_GRAPHS) from 0.53x to 0.40x the recipe's time, for 10.6 s
# of compiling per shape at a worker's start (13.2 s and 9.3 s at 512x384
# in runs 4 and 5, each a fresh process; the fast preset's shapes took
# 29.1 s and 19.4 s in run 4, 36.9 s and 13.4 s in run 5).
WARM_UP_PRESETS = ("fast", "seed")

PRESETS = ("fast", "seed")
SPACES = ("pixels", "normalized")
OPTIMIZERS = ("lbfgs", "adam")
INITS = ("content", "noise")
POOLINGS = ("max", "avg")
FORMATS = ("png", "jpeg", "webp")
