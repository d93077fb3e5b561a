import numpy as np
import pytest
import torch
from PIL import Image

from benchmarks.reference_augment import ReferenceAugmentationDINO
from dino_sparo.data.augment import DataAugmentationDINO


def photo_like(width=90, height=70, seed=0):
    """Smooth colour gradients plus texture, so crops, jitter and blur all change pixel values."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width] / max(width, height)
    channels = [np.sin(6 * x + 1), np.cos(5 * y), np.sin(4 * (x + y))]
    image = (np.stack(channels, -1) * 0.35 + 0.5) * 255 + rng.normal(0, 12, (height, width, 3))
    return Image.fromarray(np.clip(image, 0, 255).astype(np.uint8))


@pytest.mark.parametrize("seed", range(6))
def test_fast_pipeline_matches_reference_chain(seed):
    """Same seed, same crop boxes and colour parameters: the crops agree with torchvision's per-crop PIL chain
    up to the resampler's rounding (a grey level, amplified by contrast and hue), for every view kind."""
    kwargs = dict(global_crops_scale=(0.4, 1.0), local_crops_scale=(0.05, 0.4), local_crops_number=4,
                  global_crop_size=48, local_crop_size=24)
    image = photo_like(seed=seed)
    torch.manual_seed(seed)
    fast = DataAugmentationDINO(**kwargs)(image)
    torch.manual_seed(seed)
    reference = ReferenceAugmentationDINO(**kwargs)(image)
    assert len(fast) == len(reference) == 6
    grey_level = 1 / 255 / 0.224  # one uint8 step after normalisation
    for ours, theirs in zip(fast, reference):
        assert ours.shape == theirs.shape and ours.dtype == theirs.dtype == torch.float32
        assert ours.is_contiguous()
        difference = (ours - theirs).abs()
        assert difference.mean() < grey_level
        # Solarisation can flip a pixel sitting at the threshold, so look at nearly all pixels, not all.
        assert difference.flatten().quantile(0.995) <= 6 * grey_level


def test_views_are_different_and_reproducible():
    augment = DataAugmentationDINO(local_crops_number=2, global_crop_size=32, local_crop_size=16)
    image = photo_like()
    torch.manual_seed(1)
    first = augment(image)
    torch.manual_seed(1)
    again = augment(image)
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert not torch.allclose(first[0], first[1])


@pytest.mark.parametrize("mode", ["L", "RGBA", "P"])
def test_non_rgb_and_small_images(mode):
    image = photo_like(20, 14).convert(mode)  # smaller than the global crop: up-sampled
    crops = DataAugmentationDINO(local_crops_number=1, global_crop_size=32, local_crop_size=16)(image)
    assert [tuple(c.shape) for c in crops] == [(3, 32, 32), (3, 32, 32), (3, 16, 16)]
    assert all(torch.isfinite(c).all() for c in crops)


def test_normalisation_of_untouched_pixels():
    """A flat grey image stays flat under crops, flips, jitter (hue and saturation of grey are no-ops) and
    blur, so each crop is exactly (grey / 255 - mean) / std, or solarised / brightness-scaled versions."""
    mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
    torch.manual_seed(0)
    crops = DataAugmentationDINO(local_crops_number=3, global_crop_size=32, local_crop_size=16)(
        Image.new("RGB", (40, 40), (128, 128, 128)))
    for crop in crops:
        values = crop * std.view(3, 1, 1) + mean.view(3, 1, 1)
        assert torch.allclose(values, values[:, :1, :1].expand_as(values), atol=1e-6)  # still flat
        grey = values[:, 0, 0]
        assert torch.allclose(grey, grey[0].expand(3), atol=1e-6)  # still grey
