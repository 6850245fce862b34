import pytest
import torch

from nnclr_fast.recipe.augment import SimCLRAugment, color_jitter, gaussian_blur, grayscale


def _identical_batch(n=8, c=3, size=24, dtype=torch.uint8):
    one = torch.randint(0, 256, (1, c, size, size), dtype=torch.uint8)
    batch = one.expand(n, -1, -1, -1).clone()
    return batch if dtype == torch.uint8 else batch.to(dtype) / 255


def _all_distinct(out):
    flat = out.flatten(1)
    return all(not torch.allclose(flat[i], flat[j]) for i in range(len(flat)) for j in range(i))


NO_COLOUR = dict(jitter_p=0.0, gray_p=0.0, blur_p=0.0)
NO_GEOMETRY = dict(scale=(1.0, 1.0), ratio=(1.0, 1.0), flip_p=0.0)


@pytest.mark.parametrize(
    "kwargs",
    [
        {},  # the full SimCLR pipeline
        NO_COLOUR,  # random resized crop alone
        dict(NO_GEOMETRY, jitter_p=1.0, gray_p=0.0, blur_p=0.0),  # colour jitter alone
        dict(NO_GEOMETRY, jitter_p=0.0, gray_p=0.0, blur_p=1.0, blur_sigma=(0.2, 3.0)),  # blur alone
    ],
)
def test_identical_images_in_a_batch_get_independent_parameters(kwargs):
    out = SimCLRAugment(16, **kwargs)(_identical_batch())
    assert _all_distinct(out)


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("dtype", [torch.uint8, torch.float32, torch.float64])
def test_shapes_dtype_and_range(channels, dtype):
    x = _identical_batch(n=5, c=channels, size=96, dtype=dtype)
    out = SimCLRAugment(32)(x)
    assert out.shape == (5, channels, 32, 32)
    assert out.dtype == torch.float32
    assert out.min() >= 0 and out.max() <= 1


def test_tiny_digits_are_upsampled():
    digits = torch.randint(0, 256, (4, 1, 8, 8), dtype=torch.uint8)
    out = SimCLRAugment(16, scale=(0.5, 1.0), flip_p=0.0, blur_sigma=(0.1, 0.8))(digits)
    assert out.shape == (4, 1, 16, 16)


def test_same_generator_state_gives_the_same_views():
    x = _identical_batch()
    aug = SimCLRAugment(16)
    a = aug(x, torch.Generator().manual_seed(3))
    b = aug(x, torch.Generator().manual_seed(3))
    c = aug(x, torch.Generator().manual_seed(4))
    torch.testing.assert_close(a, b)
    assert not torch.allclose(a, c)


def test_everything_off_is_the_identity():
    x = torch.rand(3, 3, 20, 20)
    out = SimCLRAugment(20, **NO_GEOMETRY, **NO_COLOUR)(x)
    torch.testing.assert_close(out, x, atol=1e-5, rtol=0)


def test_flip_mirrors_and_is_drawn_per_image():
    x = torch.rand(1, 3, 12, 12).expand(200, -1, -1, -1)
    out = SimCLRAugment(12, scale=(1.0, 1.0), ratio=(1.0, 1.0), flip_p=0.5, **NO_COLOUR)(x)
    flipped = torch.isclose(out, x.flip(-1), atol=1e-5).flatten(1).all(dim=1)
    kept = torch.isclose(out, x, atol=1e-5).flatten(1).all(dim=1)
    assert bool((flipped | kept).all())
    assert 60 < int(flipped.sum()) < 140


def test_crop_zooms_into_the_image():
    # Left half black, right half white: a small crop is mostly one colour or the other.
    x = torch.zeros(64, 1, 32, 32)
    x[..., 16:] = 1.0
    out = SimCLRAugment(32, scale=(0.05, 0.1), flip_p=0.0, **NO_COLOUR)(x)
    means = out.mean(dim=(1, 2, 3))
    assert ((means < 0.2) | (means > 0.8)).float().mean() > 0.5


def test_grayscale_makes_channels_equal():
    x = torch.rand(6, 3, 10, 10)
    out = SimCLRAugment(10, **NO_GEOMETRY, jitter_p=0.0, gray_p=1.0, blur_p=0.0)(x)
    assert torch.allclose(out[:, 0], out[:, 1]) and torch.allclose(out[:, 1], out[:, 2])
    torch.testing.assert_close(out[:, :1], grayscale(x))


def test_colour_jitter_factors():
    x = torch.rand(2, 3, 5, 5) * 0.5
    ones, zero = torch.ones(2), torch.zeros(2)
    torch.testing.assert_close(color_jitter(x, ones, ones, ones, zero), x, atol=1e-5, rtol=0)
    torch.testing.assert_close(color_jitter(x, ones * 2, ones, ones, zero), x * 2, atol=1e-5, rtol=0)
    # Zero contrast leaves every pixel at the image's mean luma; zero saturation leaves gray.
    flat = color_jitter(x, ones, zero, ones, zero)
    assert torch.allclose(flat, flat.mean(dim=(1, 2, 3), keepdim=True).expand_as(flat), atol=1e-5)
    gray = color_jitter(x, ones, ones, zero, zero)
    assert torch.allclose(gray[:, 0], gray[:, 2], atol=1e-5)
    # A hue shift keeps luma and leaves gray pixels gray.
    shifted = color_jitter(x, ones, ones, ones, torch.full((2,), 0.25))
    assert not torch.allclose(shifted, x, atol=1e-3)
    g = grayscale(x).expand(-1, 3, -1, -1)
    torch.testing.assert_close(color_jitter(g, ones, ones, ones, torch.full((2,), 0.3)), g, atol=1e-5, rtol=0)


def test_gaussian_blur_smooths_and_preserves_constants():
    x = torch.zeros(2, 1, 9, 9)
    x[:, :, 4, 4] = 1.0
    out = gaussian_blur(x, torch.tensor([1e-4, 1.5]), 5)
    torch.testing.assert_close(out[0], x[0])
    assert out[1, 0, 4, 4] < 0.5 and out[1, 0, 4, 5] > 0
    flat = torch.full((1, 3, 7, 7), 0.4)
    torch.testing.assert_close(gaussian_blur(flat, torch.tensor([2.0]), 5), flat)
    with pytest.raises(ValueError, match="odd"):
        gaussian_blur(x, torch.tensor([1.0, 1.0]), 4)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(scale=(0.0, 1.0)), "scale"),
        (dict(ratio=(2.0, 1.0)), "ratio"),
        (dict(flip_p=1.5), "flip_p"),
        (dict(brightness=-0.1), "brightness"),
        (dict(hue=0.7), "hue"),
        (dict(blur_sigma=(0.0, 1.0)), "blur_sigma"),
        (dict(blur_kernel=4), "blur_kernel"),
    ],
)
def test_bad_parameters_are_value_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SimCLRAugment(16, **kwargs)


def test_bad_image_shape_is_a_value_error():
    with pytest.raises(ValueError, match="C = 1 or 3"):
        SimCLRAugment(16)(torch.rand(2, 4, 16, 16))
