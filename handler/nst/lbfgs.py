"""L-BFGS with its whole state on the device: no host sync inside a step.

`torch.optim.LBFGS` reads about 70 scalars back to the host per step (its
curvature test, step length and two-loop recursion are Python control flow on
`.item()` values), which leaves a GPU idle most of the step. Here every
decision is a tensor operation:

- the direction comes from the compact representation of the inverse Hessian
  (Byrd, Nocedal & Schnabel 1994), so the history is read with two batched
  matrix products instead of 4m sequential small kernels, and a pair that
  fails the curvature test is masked out instead of branched around;
- the step is bounded in the infinity norm (`max_move`, in the units of the
  optimized variable: [0,1] pixels, or normalized values with space=normalized):
  the objective's gradients are in the hundreds at the recipe's weights, so an
  unscaled first step moved every pixel out of the image's range, where the
  clamp the objective applies has no gradient, and the optimizer stalled for
  good (issue #11);
- pixels at a bound whose gradient points outward are held there (projected
  L-BFGS): the clamp inside the objective has no gradient past the bounds, so
  they could never come back on their own.

Every tensor has a leading batch dimension B: each image has its own history,
its own scalars and its own step bound, so independent requests can share one
optimization. Shapes are static from step to step, so a step can be captured
in a CUDA graph.
"""
from __future__ import annotations

from dataclasses import dataclass, fields

import torch
from torch import Tensor

from .config import LBFGS_HISTORY, LBFGS_HISTORY_DTYPE, LBFGS_MEMORY, LBFGS_MIN_HISTORY
from .losses import bmm_f32

# A pair (s, y) enters the history only if s.y > CURVATURE_EPS * y.y: the
# inverse-Hessian update needs s.y > 0, and a relative test is independent of
# the loss's scale (torch.optim.LBFGS's absolute 1e-10 dropped the first pair
# whenever the first step was short).
CURVATURE_EPS = 1e-10


def history_dtype(device_type: str) -> torch.dtype:
    """What S and Y are stored in on a `device_type` ("cpu", "cuda") device
    (LBFGS_HISTORY_DTYPE; float32 where it names none)."""
    return getattr(torch, LBFGS_HISTORY_DTYPE.get(device_type, "float32"))


def pair_bytes(pixels: int, device_type: str) -> int:
    """One history pair of an RGB image of `pixels` pixels: two vectors of 3 x pixels."""
    return 2 * 3 * pixels * history_dtype(device_type).itemsize


def history_pairs(pixels: int, device_type: str) -> int:
    """LBFGS_HISTORY pairs, fewer where they would pass LBFGS_MEMORY bytes (at least LBFGS_MIN_HISTORY)."""
    return max(LBFGS_MIN_HISTORY, min(LBFGS_HISTORY, LBFGS_MEMORY // pair_bytes(pixels, device_type)))


@dataclass
class State:
    """One batch's optimizer state; all tensors on the device."""

    S: Tensor  # (B, m, n) steps x_{k+1} - x_k, ring buffer (history_dtype(device.type); the rest float32)
    Y: Tensor  # (B, m, n) gradient changes
    SY: Tensor  # (B, m, m) SY[i, j] = s_i . y_j, in slot order
    YY: Tensor  # (B, m, m) y_i . y_j
    valid: Tensor  # (B, m) 1.0 where the slot holds an accepted pair
    gamma: Tensor  # (B,) the initial inverse Hessian is gamma * I
    slot: Tensor  # () int64, the slot the next pair is written to
    x_prev: Tensor  # (B, n)
    g_prev: Tensor  # (B, n)
    started: Tensor  # (B,) bool: x_prev / g_prev hold a previous iterate


def tensors(state: State) -> tuple[Tensor, ...]:
    """The state's tensors in field order: `State(*tensors(state))` is the same
    state (the same tensors, not copies)."""
    return tuple(getattr(state, f.name) for f in fields(State))


def init_state(batch: int, n: int, history: int, device: torch.device) -> State:
    f32 = dict(device=device, dtype=torch.float32)
    stored = dict(device=device, dtype=history_dtype(device.type))
    state = State(
        S=torch.empty(batch, history, n, **stored),
        Y=torch.empty(batch, history, n, **stored),
        SY=torch.empty(batch, history, history, **f32),
        YY=torch.empty(batch, history, history, **f32),
        valid=torch.empty(batch, history, **f32),
        gamma=torch.empty(batch, **f32),
        slot=torch.empty((), device=device, dtype=torch.long),
        x_prev=torch.empty(batch, n, **f32),
        g_prev=torch.empty(batch, n, **f32),
        started=torch.empty(batch, device=device, dtype=torch.bool),
    )
    reset(state)
    return state


def reset(state: State) -> None:
    """Back to an empty history, in place, so that a kept optimization (whose
    CUDA graph holds these very tensors) starts a new image as a fresh state
    would. S and Y are zeroed too, not only masked: a masked pair still
    enters the direction multiplied by 0, and 0 * inf from a diverged image
    would be NaN."""
    for t in (state.S, state.Y, state.SY, state.YY, state.valid, state.slot, state.x_prev, state.g_prev):
        t.zero_()
    state.gamma.fill_(1.0)
    state.started.fill_(False)


def _bdot(a: Tensor, b: Tensor) -> Tensor:
    """(B, n), (B, n) -> (B,)"""
    return (a * b).sum(-1)


def _products(M: Tensor, V: Tensor) -> Tensor:
    """M @ V in float32: (B, a, b) @ (B, b, k) -> (B, a, k), for M the
    history (or its transpose) and V float32 vectors. With a 16-bit history
    V is rounded to its dtype as well, and the products are accumulated and
    returned in float32 (`bmm_f32`: on a GPU one matmul that reads the
    history at half the bytes)."""
    if M.dtype == torch.float32:
        return torch.bmm(M, V)
    return bmm_f32(M, V.to(M.dtype))


def update_history(state: State, x: Tensor, g: Tensor, usable: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Record the pair from the previous iterate to (x, g), in place, as
    torch.optim.LBFGS does: a pair that fails the curvature test, or whose
    gradient is not `usable` (B,), is not recorded, and evicts nothing. The
    slot the pair would take keeps its pair, and the slot advances only if
    some image's pair is new (with one image per state: if its pair is).
    Where images share a state and the slot advances past an image whose
    pair is not new, its pair there is masked out: the slot becomes the
    newest in time order, where that image's oldest pair would be out of
    order (its history is one pair shorter, never wrong).

    Returns S^T g and Y^T g, (B, m) each in slot order, for `direction`: they
    come out of the same two batched products as the update's own, so the
    history is read twice per step here and twice in `direction`."""
    s = x - state.x_prev  # (B, n)
    y = g - state.g_prev
    # The test is on the pair as it will be stored: rounded to a 16-bit
    # history, s.y may turn non-positive, and R's diagonal (D) is made of the
    # stored numbers: a non-positive one there points the direction uphill.
    stored_s, stored_y = s.to(state.S.dtype).float(), y.to(state.Y.dtype).float()
    sy, yy = _bdot(stored_s, stored_y), _bdot(stored_y, stored_y)
    new = (sy > CURVATURE_EPS * yy) & (yy > 0) & state.started  # (B,): this pair enters the history
    if usable is not None:
        new = new & usable
    m = state.S.shape[1]
    idx = state.slot.view(1)  # (1,): the slot as an index, for index_select / index_copy_ without a host read
    keep = new.view(-1, 1)  # (B, 1): one flag per image, across its n values
    s = torch.where(keep, s, state.S.index_select(1, idx).squeeze(1))  # (B, n): else the pair already there
    y = torch.where(keep, y, state.Y.index_select(1, idx).squeeze(1))
    kept_ok = state.valid.index_select(1, idx).squeeze(1) > 0
    state.S.index_copy_(1, idx, s.unsqueeze(1).to(state.S.dtype))
    state.Y.index_copy_(1, idx, y.unsqueeze(1).to(state.Y.dtype))
    S_prod = _products(state.S, torch.stack([y, g], -1))  # (B, m, 2): s_i . y, s_i . g
    Y_prod = _products(state.Y, torch.stack([s, y, g], -1))  # (B, m, 3): y_i . s, y_i . y, y_i . g
    state.SY.index_copy_(1, idx, Y_prod[:, :, 0].unsqueeze(1))  # row: s . y_j
    state.SY.index_copy_(2, idx, S_prod[:, :, 0].unsqueeze(2))  # column: s_i . y
    state.YY.index_copy_(1, idx, Y_prod[:, :, 1].unsqueeze(1))
    state.YY.index_copy_(2, idx, Y_prod[:, :, 1].unsqueeze(2))
    # R's diagonal as stored (the column copy above wrote it last, from
    # S_prod; summed in another order than _bdot's): a pair whose stored s.y
    # is not positive after all is masked out.
    diagonal = S_prod.index_select(1, idx).squeeze(1)[:, 0]  # (B,)
    advance = new.any()
    valid = torch.where(new, diagonal > 0, kept_ok & ~advance)
    state.valid.index_copy_(1, idx, valid.float().unsqueeze(1))
    state.gamma.copy_(torch.where(new, sy / yy.clamp_min(1e-30), state.gamma))
    state.slot.copy_((state.slot + advance.long()) % m)
    return S_prod[:, :, 1], Y_prod[:, :, 2]


def direction(state: State, g: Tensor, Sg: Tensor | None = None, Yg: Tensor | None = None) -> Tensor:
    """-H g for the inverse-Hessian approximation H held in `state`: (B, n).
    `Sg`, `Yg` (S^T g and Y^T g in slot order) are computed if not given.

    H = gamma I + [S gamma Y] M [S^T; gamma Y^T] with, in chronological order,
    M = [[R^-T (D + gamma Y^T Y) R^-1, -R^-T], [-R^-1, 0]], R the upper
    triangle of S^T Y and D its diagonal. Masked pairs get an identity row and
    column in R and D and zero coefficients, which makes them no-ops."""
    B, m, _ = state.S.shape
    if Sg is None:
        Sg = _products(state.S, g.unsqueeze(-1)).squeeze(-1)  # (B, m, n) @ (B, n, 1) -> (B, m)
    if Yg is None:
        Yg = _products(state.Y, g.unsqueeze(-1)).squeeze(-1)  # (B, m)
    # Chronological order of the slots, oldest first: slot is the oldest (next to be overwritten).
    order = (state.slot + torch.arange(m, device=g.device)) % m  # (m,)
    v = state.valid[:, order]  # (B, m)
    a = Sg[:, order] * v  # S^T g: (B, m)
    b = Yg[:, order] * v  # Y^T g
    vv = v.unsqueeze(2) * v.unsqueeze(1)  # (B, m, m)
    SY = state.SY[:, order][:, :, order] * vv
    YY = state.YY[:, order][:, :, order] * vv
    eye = torch.eye(m, device=g.device)
    pad = (1 - v).unsqueeze(2) * eye  # identity where a pair is masked
    R = torch.triu(SY) + pad
    D = torch.diagonal(SY, dim1=1, dim2=2).unsqueeze(2) * eye + pad  # (B, m, m), diagonal
    gamma = state.gamma.view(B, 1, 1)  # (B,) -> (B, 1, 1), to scale each image's (m, m) blocks
    q = torch.linalg.solve_triangular(R, a.unsqueeze(-1), upper=True)  # R^-1 a: (B, m, 1)
    w = torch.bmm(D + gamma * YY, q) - gamma * b.unsqueeze(-1)
    p1 = torch.linalg.solve_triangular(R.transpose(1, 2), w, upper=False)  # (B, m, 1)
    p2 = -gamma * q
    # Back to slot order to combine with S and Y as stored.
    inv = torch.empty_like(order)
    inv[order] = torch.arange(m, device=g.device)
    p1, p2 = p1[:, inv], p2[:, inv]
    # H g = gamma g + S^T p1 + Y^T p2: (B, n) + (B, n, m) @ (B, m, 1) -> (B, n), twice
    hg = state.gamma.view(B, 1) * g + _products(state.S.transpose(1, 2), p1).squeeze(-1) \
        + _products(state.Y.transpose(1, 2), p2).squeeze(-1)
    return -hg


def step(
    state: State,
    x: Tensor,
    g: Tensor,
    *,
    lr: float,
    max_move: float,
    lower: float | None = 0.0,
    upper: float | None = 1.0,
    usable: Tensor | None = None,
) -> Tensor:
    """One L-BFGS iteration from x with gradient g, both (B, n): returns the
    next iterate, and updates `state` in place. No host sync.

    The step is `lr` times the quasi-Newton step, shortened so that no
    coordinate moves more than `max_move`, whatever `lr`; with bounds, coordinates at a bound
    whose gradient points out are held (their gradient and step are zeroed),
    and the result is projected onto the box.

    `usable` (B,) bool: where False, g is not to be used (a float16 gradient
    that overflowed): that image's step is a no-op. It stays at x, and the
    state still holds the last usable iterate and gradient, so the next
    usable step at x records the pair from there."""
    x, g = x.detach(), g.detach()
    x_in = x
    if usable is not None:
        keep = usable.view(-1, 1)  # (B, 1), as in `update_history`
        # Stand-ins that are finite and leave x_prev / g_prev as they are.
        x = torch.where(keep, x, state.x_prev)
        g = torch.where(keep, g, state.g_prev)
    held = None
    if lower is not None and upper is not None:
        held = ((x <= lower) & (g > 0)) | ((x >= upper) & (g < 0))
        g = g.masked_fill(held, 0.0)
    Sg, Yg = update_history(state, x, g, usable)
    d = direction(state, g, Sg, Yg)
    if held is not None:
        # A pixel at a bound also stays when the quasi-Newton direction (not
        # only the gradient) points out: the projection would cut that move,
        # and the curvature pair would record a step that was not taken.
        out = ((x <= lower) & (d < 0)) | ((x >= upper) & (d > 0))
        d = d.masked_fill(held | out, 0.0)
    longest = d.abs().amax(-1, keepdim=True)  # (B, 1)
    bound = max_move / longest.clamp_min(1e-30)  # the step scale that moves the longest coordinate max_move
    # lr scales the (bounded) step; past 1 it may not break the bound, or an
    # lr of a few saturates every pixel, where the clamp has no gradient.
    t = torch.minimum(torch.clamp(bound, max=1.0) * lr, bound)
    x_next = x + t * d
    if lower is not None and upper is not None:
        x_next = x_next.clamp(lower, upper)
    state.x_prev.copy_(x)
    state.g_prev.copy_(g)
    if usable is None:
        state.started.fill_(True)
        return x_next
    state.started.copy_(state.started | usable)
    return torch.where(keep, x_next, x_in)
