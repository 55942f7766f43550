"""Differentiable augmentation of D's inputs (DiffAugment, Zhao et al. 2020, "Differentiable
Augmentation for Data-Efficient GAN Training").

Every image D sees in training, real or fake, in D's step and in G's, goes through the same random
family of transforms, each image with its own draw. The transforms are differentiable in the image,
so G's gradient flows through them, and because D only ever judges augmented images, G is pushed to
produce images whose *augmented* distribution matches the augmented data: for these transforms that
is the data distribution itself, while D can no longer memorise a small training set.

`data.augment` names the policy, a comma-separated list applied in this order:

- `color`: brightness x + U(-0.5, 0.5); saturation (RGB only) (x - mean_c) * U(0, 2) + mean_c;
  contrast (x - mean) * U(0.5, 1.5) + mean (mean over channels and pixels), each per image;
- `translation`: an integer shift in [-r, r] pixels along each axis, r = round(resolution / 8),
  the uncovered border filled with -1 (the black of images in [-1, 1]; the paper pads with 0,
  which for our dark-background digits would paint a grey frame D could learn to look for);
- `cutout`: a square of half the resolution, at a uniformly random centre, set to 0.

StyleGAN2-ADA's pipeline (Karras et al. 2020, appendix B), as R3GAN uses it (`ada` is all three):

- `ada-geometric`: x-flip, rotation by a multiple of 90 degrees, integer translation (up to 1/8 of
  the size), isotropic scaling (log2-normal, std 0.2), rotation (uniform, applied before and after the
  anisotropic scaling, each with probability 1 - sqrt(1 - p)), anisotropic scaling (std 0.2), and
  fractional translation (normal, std 1/8): each with probability p, composed into one matrix per
  image and applied by one bilinear resampling with reflection padding (ADA also oversamples 2x
  through a wavelet filter against aliasing; this does not);
- `ada-color`: brightness (normal, std 0.2), contrast (log2-normal, std 0.5), luma flip, hue rotation
  (uniform) and saturation (log2-normal, std 1), each with probability p / 2 (R3GAN's multipliers;
  `data.ada_multipliers` sets any transform's), composed into one affine colour matrix (on one-channel images, its mean over the colour inputs);
- `cutout` as above (ADA's cutout is the same square of half the size).

All three are differentiable in the image to every order (grid_sample is linear in it), so they
combine with the exact R1/R2 penalties.

The random draws come from the device's default generator, which the trainer seeds per rank and
stores in every checkpoint, so a resumed run augments exactly as the uninterrupted one.
"""

from __future__ import annotations

import math

import torch

from distgan.errors import UserError

OPS = ("color", "translation", "cutout", "ada-geometric", "ada-color")
ALIASES = {"ada": ("ada-geometric", "ada-color", "cutout")}  # StyleGAN2-ADA's bgc + cutout, as R3GAN uses it
GATED = ("ada-geometric", "ada-color")  # ops that draw their own per-transform gates from p


def parse(policy: str) -> tuple[str, ...]:
    """The ops of a policy string ('' or 'none': no augmentation), validated; `ada` expands to its ops."""
    if policy.strip().lower() in ("", "none"):
        return ()
    ops = tuple(o for p in policy.split(",") for o in ALIASES.get(p.strip(), (p.strip(),)))
    bad = [p for p in ops if p not in OPS]
    if bad or len(set(ops)) != len(ops):
        raise UserError(
            f"config key 'data.augment' is a comma-separated list of {', '.join(OPS)} or ada (= "
            f"{'+'.join(ALIASES['ada'])}), each at most once, or empty; got '{policy}'"
        )
    return ops


def _uniform(x: torch.Tensor) -> torch.Tensor:
    return torch.rand(x.size(0), 1, 1, 1, dtype=x.dtype, device=x.device)


def draw_color(x: torch.Tensor) -> tuple[torch.Tensor, ...]:
    return _uniform(x), _uniform(x), _uniform(x)


def color(x: torch.Tensor, params: tuple[torch.Tensor, ...] | None = None) -> torch.Tensor:
    """params: per-image U(0, 1) draws (brightness, saturation, contrast), each (N, 1, 1, 1)."""
    b, s, c = params if params is not None else draw_color(x)
    x = x + (b - 0.5)
    if x.size(1) == 3:
        mean = x.mean(dim=1, keepdim=True)
        x = (x - mean) * (s * 2) + mean
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    return (x - mean) * (c + 0.5) + mean


def draw_translation(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    n, _, h, w = x.shape
    sh, sw = int(h / 8 + 0.5), int(w / 8 + 0.5)
    return torch.randint(-sh, sh + 1, (n,), device=x.device), torch.randint(-sw, sw + 1, (n,), device=x.device)


def translation(x: torch.Tensor, params: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """params: per-image integer shifts (dy, dx), each (N,) in [-r, r], r = round(size / 8):
    out[i, j] = x[i - dy, j - dx], -1 where that falls outside."""
    n, _, h, w = x.shape
    sh, sw = int(h / 8 + 0.5), int(w / 8 + 0.5)
    if params is None:
        params = draw_translation(x)
    dy, dx = (p.to(x.device).view(n, 1) for p in params)
    padded = torch.nn.functional.pad(x, (sw, sw, sh, sh), value=-1.0)
    rows = torch.arange(h, device=x.device)[None, :] + sh - dy  # (n, h)
    cols = torch.arange(w, device=x.device)[None, :] + sw - dx
    batch = torch.arange(n, device=x.device)[:, None, None]
    out = padded[batch, :, rows[:, :, None], cols[:, None, :]]  # (n, h, w, c)
    return out.permute(0, 3, 1, 2).contiguous()


def draw_cutout(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    n, _, h, w = x.shape
    kh, kw = int(h / 2 + 0.5), int(w / 2 + 0.5)
    return (
        torch.randint(0, h + (1 - kh % 2), (n,), device=x.device),
        torch.randint(0, w + (1 - kw % 2), (n,), device=x.device),
    )


def cutout(x: torch.Tensor, params: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """params: per-image centres (cy, cx), each (N,): the square of side k = round(size / 2) with top
    left corner (cy - k // 2, cx - k // 2) is set to 0 (clipped at the border)."""
    n, _, h, w = x.shape
    kh, kw = int(h / 2 + 0.5), int(w / 2 + 0.5)
    if params is None:
        params = draw_cutout(x)
    cy, cx = (p.to(x.device).view(n, 1) for p in params)
    ys = torch.arange(h, device=x.device)[None, :] - (cy - kh // 2)
    xs = torch.arange(w, device=x.device)[None, :] - (cx - kw // 2)
    inside = ((ys >= 0) & (ys < kh))[:, :, None] & ((xs >= 0) & (xs < kw))[:, None, :]  # (n, h, w)
    return x * (~inside)[:, None].to(x.dtype)


# -- StyleGAN2-ADA's geometric and colour transforms ---------------------------------------------------

GEOMETRIC = {"xflip": 1.0, "rotate90": 1.0, "xint": 1.0, "scale": 1.0, "rotate": 1.0, "aniso": 1.0, "xfrac": 1.0}
COLOR = {"brightness": 0.5, "contrast": 0.5, "lumaflip": 0.5, "hue": 0.5, "saturation": 0.5}  # R3GAN's
XINT_MAX, SCALE_STD, ROTATE_MAX, ANISO_STD, XFRAC_STD = 0.125, 0.2, 1.0, 0.2, 0.125
BRIGHTNESS_STD, CONTRAST_STD, HUE_MAX, SATURATION_STD = 0.2, 0.5, 1.0, 1.0


def multipliers(spec: str) -> dict[str, float]:
    """data.ada_multipliers: 'name=value,...' over R3GAN's defaults (GEOMETRIC, COLOR); '' = the defaults."""
    out = {**GEOMETRIC, **COLOR}
    for item in filter(None, (t.strip() for t in spec.split(","))):
        name, _, value = item.partition("=")
        try:
            number = float(value)
        except ValueError:
            number = -1.0
        if name.strip() not in out or number < 0:
            raise UserError(
                f"config key 'data.ada_multipliers' takes name=value (value >= 0) for {', '.join(out)}; got '{item}'"
            )
        out[name.strip()] = number
    return out


def _gate(n: int, p, device) -> torch.Tensor:
    """(n,) bool: each image's transform is on with probability p (a float or a device tensor)."""
    return torch.rand(n, device=device) < p


def _matrices(n: int, device, dtype) -> torch.Tensor:
    return torch.eye(3, device=device, dtype=dtype).repeat(n, 1, 1)


def _affine(a, b, c, d, tx, ty) -> torch.Tensor:
    """(n, 3, 3) [[a, b, tx], [c, d, ty], [0, 0, 1]] from (n,) tensors."""
    zero, one = torch.zeros_like(a), torch.ones_like(a)
    return torch.stack([a, b, tx, c, d, ty, zero, zero, one], dim=1).view(-1, 3, 3)


def _rotation(theta: torch.Tensor) -> torch.Tensor:
    z = torch.zeros_like(theta)
    return _affine(theta.cos(), -theta.sin(), theta.sin(), theta.cos(), z, z)


def _scaling(sx: torch.Tensor, sy: torch.Tensor) -> torch.Tensor:
    z = torch.zeros_like(sx)
    return _affine(sx, z, z, sy, z, z)


def _shift(tx: torch.Tensor, ty: torch.Tensor) -> torch.Tensor:
    one, z = torch.ones_like(tx), torch.zeros_like(tx)
    return _affine(one, z, z, one, tx, ty)


def draw_ada_geometric(x: torch.Tensor, p=1.0, mult: dict[str, float] | None = None) -> tuple[torch.Tensor]:
    """The (n, 2, 3) sampling matrices (output -> input, in grid_sample's [-1, 1] coordinates) of ADA's
    geometric transforms, each on with probability p x its multiplier (`mult`, default GEOMETRIC)."""
    mult = {**GEOMETRIC, **(mult or {})}
    n, dev, dt = x.size(0), x.device, torch.float32
    m = _matrices(n, dev, dt)
    eye = _matrices(n, dev, dt)

    def gated(name: str, mat: torch.Tensor, prob=None) -> torch.Tensor:
        on = _gate(n, p * mult[name] if prob is None else prob, dev)[:, None, None]
        return m @ torch.where(on, mat, eye)

    flip = 1 - 2 * torch.randint(0, 2, (n,), device=dev).to(dt)
    m = gated("xflip", _scaling(flip, torch.ones_like(flip)))
    m = gated("rotate90", _rotation(-math.pi / 2 * torch.randint(0, 4, (n,), device=dev).to(dt)))
    size = x.shape[-1]  # an integer shift of t * size pixels is 2 t in [-1, 1] units on a square image
    t = torch.round((torch.rand(2, n, device=dev) * 2 - 1) * XINT_MAX * size) * 2 / size
    m = gated("xint", _shift(t[0], t[1]))
    s = torch.exp2(torch.randn(n, device=dev) * SCALE_STD)
    m = gated("scale", _scaling(s, s))
    p_rot = 1 - (1 - torch.clamp(torch.as_tensor(p * mult["rotate"], device=dev), 0, 1)) ** 0.5
    m = gated("rotate", _rotation(-(torch.rand(n, device=dev) * 2 - 1) * math.pi * ROTATE_MAX), p_rot)
    s = torch.exp2(torch.randn(n, device=dev) * ANISO_STD)
    m = gated("aniso", _scaling(s, 1 / s))
    m = gated("rotate", _rotation(-(torch.rand(n, device=dev) * 2 - 1) * math.pi * ROTATE_MAX), p_rot)
    t = torch.randn(2, n, device=dev) * XFRAC_STD * 2
    m = gated("xfrac", _shift(t[0], t[1]))
    return (m[:, :2, :],)


def ada_geometric(x: torch.Tensor, params: tuple[torch.Tensor] | None = None) -> torch.Tensor:
    """x resampled through the drawn matrices: bilinear, reflection padding (the identity matrix gives
    x back to float rounding; at p = 0 the op is skipped)."""
    (theta,) = params if params is not None else draw_ada_geometric(x)
    grid = torch.nn.functional.affine_grid(theta.to(x.dtype), list(x.shape), align_corners=False)
    return torch.nn.functional.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)


def draw_ada_color(x: torch.Tensor, p=1.0, mult: dict[str, float] | None = None) -> tuple[torch.Tensor]:
    """The (n, 3, 4) affine colour matrices of ADA's colour transforms (on RGB in [-1, 1] around 0),
    each on with probability p x its multiplier (`mult`, default COLOR)."""
    mult = {**COLOR, **(mult or {})}
    n, dev, dt = x.size(0), x.device, torch.float32
    eye = torch.eye(4, device=dev, dtype=dt).repeat(n, 1, 1)
    c = eye.clone()
    v = torch.tensor([1.0, 1.0, 1.0, 0.0], device=dev, dtype=dt) / math.sqrt(3)  # the luma axis
    vv = torch.outer(v, v)

    def gated(name: str, mat: torch.Tensor) -> torch.Tensor:
        on = _gate(n, p * mult[name], dev)[:, None, None]
        return torch.where(on, mat, eye) @ c

    b = torch.randn(n, device=dev) * BRIGHTNESS_STD
    shift = eye.clone()
    shift[:, :3, 3] = b[:, None]
    c = gated("brightness", shift)
    k = torch.exp2(torch.randn(n, device=dev) * CONTRAST_STD)
    c = gated("contrast", torch.diag_embed(torch.stack([k, k, k, torch.ones_like(k)], 1)))
    i = torch.randint(0, 2, (n, 1, 1), device=dev).to(dt)
    c = gated("lumaflip", eye - 2 * vv * i)
    theta = (torch.rand(n, device=dev) * 2 - 1) * math.pi * HUE_MAX
    c = gated("hue", _rotate_about(v[:3], theta, eye))
    s = torch.exp2(torch.randn(n, device=dev) * SATURATION_STD)[:, None, None]
    c = gated("saturation", vv + (eye - vv) * s)
    return (c[:, :3, :],)


def _rotate_about(axis: torch.Tensor, theta: torch.Tensor, eye: torch.Tensor) -> torch.Tensor:
    """(n, 4, 4) rotations by theta about a unit 3-vector (Rodrigues), homogeneous."""
    x, y, z = axis
    k = torch.stack([torch.stack([0 * x, -z, y]), torch.stack([z, 0 * x, -x]), torch.stack([-y, x, 0 * x])])
    sin, cos = theta.sin()[:, None, None], theta.cos()[:, None, None]
    r = torch.eye(3, device=theta.device) + sin * k + (1 - cos) * (k @ k)
    out = eye.clone()
    out[:, :3, :3] = r
    return out


def ada_color(x: torch.Tensor, params: tuple[torch.Tensor] | None = None) -> torch.Tensor:
    """x through the drawn colour matrices: RGB' = A RGB + b; one channel: the mean over A's inputs."""
    (c,) = params if params is not None else draw_ada_color(x)
    c = c.to(x.dtype)
    if x.size(1) == 3:
        return torch.einsum("nij,njhw->nihw", c[:, :, :3], x) + c[:, :, 3, None, None]
    gray = c.mean(dim=1, keepdim=True)  # (n, 1, 4)
    return x * gray[:, :, :3].sum(dim=2)[:, :, None, None] + gray[:, :, 3, None, None]


FUNCTIONS = {
    "color": color,
    "translation": translation,
    "cutout": cutout,
    "ada-geometric": ada_geometric,
    "ada-color": ada_color,
}
DRAWS = {
    "color": draw_color,
    "translation": draw_translation,
    "cutout": draw_cutout,
    "ada-geometric": draw_ada_geometric,
    "ada-color": draw_ada_color,
}

# One batch's random draws, op by op: (keep mask or None, the op's parameters), None for an op not applied.
Draws = list[tuple[torch.Tensor | None, tuple[torch.Tensor, ...]] | None]


def draw(
    ops: tuple[str, ...], x: torch.Tensor, p: float | torch.Tensor = 1.0, mult: dict[str, float] | None = None
) -> Draws:
    """The random draws `apply` makes for a batch shaped like x, in the order it makes them, so a
    second batch (x perturbed, for the approximate gradient penalties) can get exactly the same
    augmentation: each op's keep mask (rand >= p, when p < 1 or p is a tensor), then its parameters."""
    on_device = isinstance(p, torch.Tensor)
    out: Draws = []
    for op in ops:
        if op in GATED:  # one gate per sub-transform, inside the draw
            out.append((None, DRAWS[op](x, p, mult)) if on_device or p > 0.0 else None)
        elif not on_device and p >= 1.0:
            out.append((None, DRAWS[op](x)))
        elif on_device or p > 0.0:
            keep = torch.rand(x.size(0), 1, 1, 1, device=x.device) >= p
            out.append((keep, DRAWS[op](x)))
        else:
            out.append(None)
    return out


def apply(
    ops: tuple[str, ...],
    x: torch.Tensor,
    p: float | torch.Tensor = 1.0,
    draws: Draws | None = None,
    mult: dict[str, float] | None = None,
) -> torch.Tensor:
    """x (N, C, H, W) through the policy's ops, each image with its own random draw; with p < 1 each
    op is applied to each image with probability p (ADA's strength), and p = 0 is the identity.
    A tensor p (ADA's, on the device) is never read on the host: every op is drawn and kept where
    rand >= p, which is the identity at p = 0 too. `draws` (from `draw`) replays given draws; `mult`:
    the ADA ops' multipliers (`multipliers`)."""
    if not ops:
        return x
    for op, drawn in zip(ops, draws if draws is not None else draw(ops, x, p, mult)):
        if drawn is None:
            continue
        keep, params = drawn
        out = FUNCTIONS[op](x, params)
        x = out if keep is None else torch.where(keep, x, out)
    return x


class Adaptive:
    """ADA's augmentation strength (Karras et al. 2020, "Training Generative Adversarial Networks
    with Limited Data", section 3): p starts at 0; every `interval` steps the overfitting heuristic
    r_t = E[sign D(x_real)] over those steps' real logits, on every rank, moves p by
    sign(r_t - target) * (real images D saw in those steps, all ranks) / (kimg * 1000), clamped to
    [0, 1]: p can go from 0 to 1 in `kimg` thousand real images (the paper's 500k).

    p, r_t and the sums stay on the device: every `interval` steps the sums are added up over ranks
    (an all-reduce, no host read), so p is the same number on every rank without the host ever
    reading it in a step. `state()` / `load_state()` carry p and the partial sums in checkpoints.
    """

    def __init__(self, target: float, interval: int = 4, kimg: float = 500.0):
        self.target, self.interval, self.kimg = target, interval, kimg
        self.p = torch.zeros((), dtype=torch.float64)  # moves to the logits' device at the first observe
        self.r_t = torch.tensor(float("nan"))  # the last heuristic value (logged)
        self.sums: torch.Tensor | None = None  # (sum of sign D(x_real), logits, real images) since the last update

    def observe(self, real_logits: torch.Tensor, images: int) -> None:
        d = torch.nan_to_num(real_logits.detach().float())  # a skipped NaN step counts as sign 0
        add = torch.stack([torch.sign(d).sum(), d.new_full((), d.numel()), d.new_full((), images)])
        self.sums = add if self.sums is None else self.sums + add
        self.p = self.p.to(d.device)

    def update(self, steps_done: int, reduce=None) -> None:
        """After a step: every `interval` steps, p moves so as to keep r_t at the target.
        `reduce` sums a tensor over ranks (None: a single process)."""
        if steps_done % self.interval or self.sums is None:
            return
        total = reduce(self.sums) if reduce is not None else self.sums
        self.r_t = total[0] / total[1].clamp_min(1.0)
        step = total[2].double() / (self.kimg * 1000)
        self.p = (self.p + torch.where(self.r_t > self.target, step, -step)).clamp(0.0, 1.0)
        self.sums = None

    def state(self) -> dict[str, torch.Tensor]:
        sums = self.sums.cpu() if self.sums is not None else torch.zeros(3)
        return {"shared.augment_p": self.p.reshape(1).double().cpu(), "augment_sums": sums.double()}

    def load_state(self, state: dict[str, torch.Tensor], device) -> None:
        self.p = state["shared.augment_p"][0].to(device=device, dtype=torch.float64)
        sums = state.get("augment_sums")
        self.sums = sums.to(device=device, dtype=torch.float32) if sums is not None and float(sums[1]) > 0 else None
