"""SimCLR's augmentations, applied to a whole batch on its device with per-image parameters.

torchvision's transforms (v1 and v2) draw ONE set of random parameters per call, so a batched
call would crop, flip and colour every image of the batch the same way; per-image calls in a
DataLoader are what make CPU data loading the bottleneck of a GPU step. Here every op is a
batched tensor op (one affine grid-sample for crop + flip, broadcast colour ops, one grouped
convolution for the blur) whose parameters are drawn per image, so the whole pipeline is a
handful of kernels regardless of batch size.

All ops take images in [0, 1] (or uint8, converted) shaped (B, C, H, W) with C = 1 or 3 and
return float32 images in [0, 1]. On single-channel images the colour-only ops (saturation,
hue, grayscale) are the identity.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

_LUMA = (0.299, 0.587, 0.114)
# RGB -> YIQ: hue is the angle of the (I, Q) chroma vector, so rotating it shifts the hue and
# leaves luma untouched, a linear per-image 3x3 map instead of an RGB->HSV->RGB round trip.
_RGB_TO_YIQ = ((0.299, 0.587, 0.114), (0.596, -0.274, -0.322), (0.211, -0.523, 0.312))


def _uniform(u: torch.Tensor, low: float, high: float) -> torch.Tensor:
    return low + u * (high - low)


def grayscale(x: torch.Tensor) -> torch.Tensor:
    """(B, 1, H, W) luma of RGB images (or the single channel itself)."""
    if x.shape[1] == 1:
        return x
    w = x.new_tensor(_LUMA).view(1, 3, 1, 1)
    return (x * w).sum(dim=1, keepdim=True)


def resized_crop_flip(
    x: torch.Tensor,
    size: int,
    scale: torch.Tensor,
    log_ratio: torch.Tensor,
    cx: torch.Tensor,
    cy: torch.Tensor,
    flip: torch.Tensor,
) -> torch.Tensor:
    """Crop a region of ``scale`` x the image area with aspect ratio exp(log_ratio), centred at
    (cx, cy) in [-1, 1] units of the free room, optionally mirrored, and resample it to
    ``size`` x ``size``: one affine grid + bilinear sample for the whole batch.

    Unlike torchvision's 10-try rejection sampling, a too-wide or too-tall box is clamped to
    the image side, so the area can come out smaller than asked, never outside the image.
    """
    ratio = log_ratio.exp()
    w = (scale * ratio).sqrt().clamp(max=1.0)
    h = (scale / ratio).sqrt().clamp(max=1.0)
    sign = 1.0 - 2.0 * flip.to(x.dtype)
    zero = torch.zeros_like(w)
    theta = torch.stack(
        [
            torch.stack([w * sign, zero, cx * (1 - w)], dim=1),
            torch.stack([zero, h, cy * (1 - h)], dim=1),
        ],
        dim=1,
    )
    grid = F.affine_grid(theta, [x.shape[0], x.shape[1], size, size], align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)


def color_jitter(
    x: torch.Tensor,
    brightness: torch.Tensor,
    contrast: torch.Tensor,
    saturation: torch.Tensor,
    hue: torch.Tensor,
) -> torch.Tensor:
    """Per-image brightness/contrast/saturation factors (1 = unchanged) and hue shift (in
    turns, 0 = unchanged), applied in that fixed order, clamping to [0, 1] after each step as
    torchvision does."""
    b = x.shape[0]
    x = (x * brightness.view(b, 1, 1, 1)).clamp(0, 1)
    mean = grayscale(x).mean(dim=(1, 2, 3), keepdim=True)
    x = ((x - mean) * contrast.view(b, 1, 1, 1) + mean).clamp(0, 1)
    if x.shape[1] == 1:
        return x
    gray = grayscale(x)
    x = (gray + (x - gray) * saturation.view(b, 1, 1, 1)).clamp(0, 1)
    to_yiq = x.new_tensor(_RGB_TO_YIQ)
    angle = hue * (2 * math.pi)
    cos, sin = angle.cos(), angle.sin()
    rot = torch.zeros(b, 3, 3, dtype=x.dtype, device=x.device)
    rot[:, 0, 0] = 1
    rot[:, 1, 1], rot[:, 1, 2] = cos, -sin
    rot[:, 2, 1], rot[:, 2, 2] = sin, cos
    mix = torch.linalg.inv(to_yiq) @ rot @ to_yiq
    return torch.einsum("bij,bjhw->bihw", mix, x).clamp(0, 1)


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """Separable Gaussian blur with a per-image sigma (reflect padding).

    A sigma near zero gives a one-hot kernel, i.e. the identity, which is how images that
    should not be blurred pass through the same grouped convolution.
    """
    if kernel_size % 2 == 0 or kernel_size < 1:
        raise ValueError(f"kernel_size must be odd and positive, got {kernel_size}")
    if kernel_size == 1:
        return x
    b, c, h, w = x.shape
    t = torch.arange(kernel_size, device=x.device, dtype=x.dtype) - kernel_size // 2
    kernel = torch.exp(-(t.view(1, -1) ** 2) / (2 * sigma.view(-1, 1) ** 2))
    kernel = kernel / kernel.sum(dim=1, keepdim=True)
    kernel = kernel.repeat_interleave(c, dim=0)
    pad = kernel_size // 2
    flat = x.reshape(1, b * c, h, w)
    flat = F.conv2d(F.pad(flat, (0, 0, pad, pad), mode="reflect"), kernel.view(b * c, 1, kernel_size, 1), groups=b * c)
    flat = F.conv2d(F.pad(flat, (pad, pad, 0, 0), mode="reflect"), kernel.view(b * c, 1, 1, kernel_size), groups=b * c)
    return flat.view(b, c, h, w)


class SimCLRAugment(nn.Module):
    """Random resized crop, horizontal flip, colour jitter, random grayscale, Gaussian blur.

    The jitter defaults are the values NNCLR takes from BYOL (brightness 0.4, contrast 0.4,
    saturation 0.2, hue 0.1, applied with p = 0.8; grayscale p = 0.2). ``blur_sigma`` is in pixels of the output image and
    ``blur_kernel`` defaults to the odd size nearest 10% of it (at least 3), so small images
    should be given a proportionally smaller sigma range.

    ``forward(images, generator=None)``: every random number comes from ``generator`` (a
    torch.Generator on the images' device) when given, which makes a run reproducible and
    resumable from the generator's saved state.
    """

    def __init__(
        self,
        size: int,
        *,
        scale: Sequence[float] = (0.08, 1.0),
        ratio: Sequence[float] = (3 / 4, 4 / 3),
        flip_p: float = 0.5,
        brightness: float = 0.4,
        contrast: float = 0.4,
        saturation: float = 0.2,
        hue: float = 0.1,
        jitter_p: float = 0.8,
        gray_p: float = 0.2,
        blur_p: float = 0.5,
        blur_sigma: Sequence[float] = (0.1, 2.0),
        blur_kernel: Optional[int] = None,
    ):
        super().__init__()
        if size < 1:
            raise ValueError(f"size must be positive, got {size}")
        if not 0 < scale[0] <= scale[1] <= 1:
            raise ValueError(f"scale must satisfy 0 < min <= max <= 1, got {tuple(scale)}")
        if not 0 < ratio[0] <= ratio[1]:
            raise ValueError(f"ratio must satisfy 0 < min <= max, got {tuple(ratio)}")
        for name, p in (("flip_p", flip_p), ("jitter_p", jitter_p), ("gray_p", gray_p), ("blur_p", blur_p)):
            if not 0 <= p <= 1:
                raise ValueError(f"{name} must be a probability in [0, 1], got {p}")
        for name, v in (("brightness", brightness), ("contrast", contrast), ("saturation", saturation)):
            if not 0 <= v <= 1:
                raise ValueError(f"{name} must be in [0, 1], got {v}")
        if not 0 <= hue <= 0.5:
            raise ValueError(f"hue must be in [0, 0.5], got {hue}")
        if not 0 < blur_sigma[0] <= blur_sigma[1]:
            raise ValueError(f"blur_sigma must satisfy 0 < min <= max, got {tuple(blur_sigma)}")
        if blur_kernel is None:
            blur_kernel = max(3, int(round(0.1 * size)) // 2 * 2 + 1)
        if blur_kernel % 2 == 0 or blur_kernel >= 2 * size:
            raise ValueError(f"blur_kernel must be odd and smaller than twice the size, got {blur_kernel}")
        self.size = size
        self.scale = (float(scale[0]), float(scale[1]))
        self.log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
        self.flip_p = flip_p
        self.jitter = (brightness, contrast, saturation, hue)
        self.jitter_p = jitter_p
        self.gray_p = gray_p
        self.blur_p = blur_p
        self.blur_sigma = (float(blur_sigma[0]), float(blur_sigma[1]))
        self.blur_kernel = blur_kernel

    def forward(self, images: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        if images.dim() != 4 or images.shape[1] not in (1, 3):
            raise ValueError(f"images must be (B, C, H, W) with C = 1 or 3, got {tuple(images.shape)}")
        x = images.float() / 255.0 if images.dtype == torch.uint8 else images.float()
        b = x.shape[0]
        # One draw for every parameter of every image: columns are independent uniforms.
        u = torch.rand(b, 13, generator=generator, device=x.device)
        x = resized_crop_flip(
            x,
            self.size,
            scale=_uniform(u[:, 0], *self.scale),
            log_ratio=_uniform(u[:, 1], *self.log_ratio),
            cx=u[:, 2] * 2 - 1,
            cy=u[:, 3] * 2 - 1,
            flip=u[:, 4] < self.flip_p,
        )
        bs, cs, ss, hs = self.jitter
        on = u[:, 5] < self.jitter_p
        one = torch.ones_like(u[:, 0])
        x = color_jitter(
            x,
            brightness=torch.where(on, _uniform(u[:, 6], 1 - bs, 1 + bs), one),
            contrast=torch.where(on, _uniform(u[:, 7], 1 - cs, 1 + cs), one),
            saturation=torch.where(on, _uniform(u[:, 8], 1 - ss, 1 + ss), one),
            hue=torch.where(on, _uniform(u[:, 9], -hs, hs), one - 1),
        )
        if x.shape[1] == 3:
            to_gray = (u[:, 10] < self.gray_p).view(b, 1, 1, 1)
            x = torch.where(to_gray, grayscale(x).expand_as(x), x)
        blur = u[:, 11] < self.blur_p
        # 1e-4 px is far below a pixel: exp(-1 / (2e-8)) underflows to an exact one-hot kernel.
        sigma = torch.where(blur, _uniform(u[:, 12], *self.blur_sigma), torch.full_like(u[:, 12], 1e-4))
        x = gaussian_blur(x, sigma, self.blur_kernel)
        return x.clamp(0, 1)
