"""Multi-crop augmentation: the reference chain, the worker side of the fast path (uint8 crops) and the device
side (batched colour, blur, solarisation and normalisation), checked against torchvision's own ops."""
import io
import itertools
import math

import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TF
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms

from dino_sparo.data import device_augment as dev
from dino_sparo.data.augment import DataAugmentationDINO, MultiCropUint8, decode_for_boxes, jpeg_reduction
from dino_sparo.data.device_augment import GROUPS, DeviceAugmentation
from dino_sparo.data.transforms import IMAGENET_MEAN, IMAGENET_STD

# Float ops here are compared on floats in [0, 1]; this is far below one grey level (1/255 = 3.9e-3).
FLOAT_TOLERANCE = 1e-5
SIZES = dict(local_crops_number=4, global_crop_size=48, local_crop_size=24)


def photo_like(width=90, height=70, seed=0):
    """Smooth colour gradients plus texture, so crops, jitter and blur all change pixel values."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width] / max(width, height)
    channels = [np.sin(6 * x + 1), np.cos(5 * y), np.sin(4 * (x + y))]
    image = (np.stack(channels, -1) * 0.35 + 0.5) * 255 + rng.normal(0, 12, (height, width, 3))
    return Image.fromarray(np.clip(image, 0, 255).astype(np.uint8))


def encoded(image, fmt, **options):
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def float_images(batch=12, size=20, seed=0):
    """Random float images; the first third quantised to quarters so that channels tie (hue sector
    precedence) and saturate (clamping), the next third uint8 levels as crops are."""
    generator = torch.Generator().manual_seed(seed)
    images = torch.rand(batch, 3, size, size, generator=generator)
    third = batch // 3
    images[:third] = (images[:third] * 4).round() / 4
    images[third:2 * third] = (images[third:2 * third] * 255).round() / 255
    return images


def per_sample(reference, images, values):
    return torch.stack([reference(image, float(value)) for image, value in zip(images, values)])


# --- device side: each batched op against torchvision's functional op, sample by sample -----------------------

@pytest.mark.parametrize("name", ["brightness", "contrast", "saturation"])
def test_blends_equal_torchvision(name):
    images = float_images()
    factors = torch.linspace(0.0, 2.0, len(images))  # wider than the jitter's range, to reach the clamps
    ours = getattr(dev, f"adjust_{name}")(images, factors)
    reference = per_sample(getattr(TF, f"adjust_{name}"), images, factors)
    torch.testing.assert_close(ours, reference, rtol=0, atol=FLOAT_TOLERANCE)


def test_hue_equals_torchvision():
    """Both compute the same continuous piecewise-linear function of (r, g, b) in float32, torchvision via
    the saturation (chroma / max), ours from the chroma; rounding of a few ulp of the sextant position (< 12)
    times the chroma (<= 1) bounds the difference by ~1e-6 (measured 1.4e-6). Asserted: 1e-5, 1/400 of a
    grey level, over all shifts in [-0.5, 0.5], ties between channels and grey pixels included."""
    images = float_images(batch=24)
    shifts = torch.linspace(-0.5, 0.5, len(images))
    ours = dev.adjust_hue(images, shifts)
    reference = per_sample(TF.adjust_hue, images, shifts)
    torch.testing.assert_close(ours, reference, rtol=0, atol=FLOAT_TOLERANCE)


def test_grayscale_and_solarize_equal_torchvision():
    images = float_images()
    torch.testing.assert_close(dev.rgb_to_grayscale(images), TF.rgb_to_grayscale(images), rtol=0,
                               atol=FLOAT_TOLERANCE)
    enabled = torch.arange(len(images)) % 2 == 0
    ours = dev.solarize(images, enabled)
    reference = torch.where(enabled.view(-1, 1, 1, 1), TF.solarize(images, 128 / 255), images)
    assert torch.equal(ours, reference)


def test_blur_equals_torchvision():
    images = float_images(size=30)
    sigmas = torch.linspace(0.1, 2.0, len(images))
    kernel_size = dev.blur_kernel_size(2.0, 30)
    assert kernel_size == 13  # 2 * ceil(3 * 2.0) + 1
    ours = dev.gaussian_blur(images, sigmas, kernel_size)
    reference = torch.stack([TF.gaussian_blur(image, [kernel_size] * 2, [float(sigma)] * 2)
                             for image, sigma in zip(images, sigmas)])
    torch.testing.assert_close(ours, reference, rtol=0, atol=FLOAT_TOLERANCE)
    enabled = torch.arange(len(images)) % 3 == 0
    partly = dev.gaussian_blur(images, sigmas, kernel_size, enabled=enabled)
    assert torch.equal(partly[~enabled], images[~enabled])  # the one-tap kernel leaves a sample as it is
    torch.testing.assert_close(partly[enabled], reference[enabled], rtol=0, atol=FLOAT_TOLERANCE)
    assert dev.blur_kernel_size(2.0, 8) == 7  # capped by the crop: reflect padding needs a margin < side


def reference_view(crop, params, index, kernel_size):
    """torchvision's functional ops on one uint8 crop, in the reference order, with our drawn parameters."""
    image = crop.to(torch.float32) / 255
    if params.jitter[index]:
        factors = (params.brightness, params.contrast, params.saturation, params.hue)
        adjust = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue)
        for op in params.order[index].tolist():
            image = adjust[op](image, float(factors[op][index]))
    if params.grayscale[index]:
        image = TF.rgb_to_grayscale(image, num_output_channels=3)
    if params.blur[index]:
        image = TF.gaussian_blur(image, [kernel_size] * 2, [float(params.sigma[index])] * 2)
    if params.solarize[index]:
        image = TF.solarize(image, 128 / 255)
    return TF.normalize(image, IMAGENET_MEAN, IMAGENET_STD)


@pytest.mark.parametrize("group", GROUPS)
def test_device_pass_equals_torchvision_chain(group):
    """The whole pass (mixed per-sample op orders in one batch) against the per-sample torchvision chain."""
    augment = DeviceAugmentation(local_crops_number=2, global_crop_size=64)
    crops = torch.from_numpy(np.stack([np.array(photo_like(32, 32, seed)) for seed in range(48)])).permute(0, 3, 1, 2)
    params = augment.draw_params(group, len(crops), torch.Generator().manual_seed(1))
    ours = augment.apply(group, crops, params)
    assert ours.dtype == torch.float32 and ours.shape == crops.shape
    kernel_size = dev.blur_kernel_size(augment.sigma_range[1], 32)
    reference = torch.stack([reference_view(crop, params, index, kernel_size) for index, crop in enumerate(crops)])
    # A pixel within rounding of the solarisation threshold may fall either side; allow a handful of them.
    close = (ours - reference).abs() <= FLOAT_TOLERANCE / min(IMAGENET_STD)
    assert close.float().mean() > 0.9999


# --- device side: parameter distributions ----------------------------------------------------------------

def binomial_ok(count, trials, p, sigmas=5.0):
    return abs(count - trials * p) <= sigmas * math.sqrt(trials * p * (1 - p)) + 1e-9


def uniform_ok(values, low, high, bins=10):
    """Each of ``bins`` equal bins holds its share within binomial tolerance, and the extremes are near the
    ends (within 0.1% of the range for 20k draws)."""
    counts = torch.histc(values, bins, low, high)
    width = high - low
    return (all(binomial_ok(int(c), len(values), 1 / bins) for c in counts)
            and low <= float(values.min()) < low + 1e-3 * width and high - 1e-3 * width < float(values.max()) <= high)


@pytest.mark.parametrize("group", GROUPS)
def test_parameters_follow_the_reference_distributions(group):
    draws = 20000
    augment = DeviceAugmentation(local_crops_number=8, global_crop_size=224)
    params = augment.draw_params(group, draws, torch.Generator().manual_seed(7))
    expected = {"jitter": 0.8, "grayscale": 0.2, "blur": {"global1": 1.0, "global2": 0.1, "local": 0.5}[group],
                "solarize": 0.2 if group == "global2" else 0.0}
    for name, p in expected.items():
        count = int(getattr(params, name).sum())
        assert binomial_ok(count, draws, p), (name, count)
    # ColorJitter's order: each of the 24 permutations equally likely.
    orders = {tuple(row): 0 for row in itertools.permutations(range(4))}
    for row in params.order.tolist():
        orders[tuple(row)] += 1
    assert len(orders) == 24 and all(binomial_ok(n, draws, 1 / 24) for n in orders.values())
    assert uniform_ok(params.brightness, 0.6, 1.4) and uniform_ok(params.contrast, 0.6, 1.4)
    assert uniform_ok(params.saturation, 0.8, 1.2) and uniform_ok(params.hue, -0.1, 0.1)
    assert uniform_ok(params.sigma, 0.1, 2.0)


def test_blur_sigma_shrinks_with_small_global_crops():
    params = DeviceAugmentation(2, global_crop_size=56).draw_params("local", 20000, torch.Generator().manual_seed(0))
    assert uniform_ok(params.sigma, 0.025, 0.5)  # [0.1, 2.0] * 56 / 224


def test_same_seed_same_views_other_seed_other_views():
    augment = DeviceAugmentation(local_crops_number=2, global_crop_size=32)
    generator = torch.Generator().manual_seed(0)
    crops = [torch.randint(0, 256, (4, 3, size, size), dtype=torch.uint8, generator=generator)
             for size in (32, 32, 16, 16)]
    first = augment(crops, torch.Generator().manual_seed(5))
    again = augment(crops, torch.Generator().manual_seed(5))
    other = augment(crops, torch.Generator().manual_seed(6))
    assert [tuple(v.shape) for v in first] == [(4, 3, 32, 32)] * 2 + [(4, 3, 16, 16)] * 2
    assert all(v.dtype == torch.float32 and v.is_contiguous() for v in first)
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert all(not torch.equal(a, b) for a, b in zip(first, other))


def test_device_pass_rejects_wrong_input():
    augment = DeviceAugmentation(local_crops_number=1, global_crop_size=32)
    generator = torch.Generator()
    crops = [torch.zeros(2, 3, 32, 32, dtype=torch.uint8)] * 2 + [torch.zeros(2, 3, 16, 16, dtype=torch.uint8)]
    with pytest.raises(ValueError, match="expected 3 crop tensors"):
        augment(crops[:2], generator)
    with pytest.raises(ValueError, match="uint8"):
        augment([c.float() for c in crops], generator)
    with pytest.raises(ValueError, match="unknown crop group"):
        augment.draw_params("global3", 2, generator)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_pass_matches_cpu_and_never_syncs():
    augment = DeviceAugmentation(local_crops_number=8, global_crop_size=224)
    generator = torch.Generator().manual_seed(0)
    crops = [torch.randint(0, 256, (16, 3, size, size), dtype=torch.uint8, generator=generator)
             for size in [224] * 2 + [96] * 8]
    cuda_crops = [c.cuda() for c in crops]
    cuda_generator = torch.Generator("cuda")
    for group, crop in (("global1", crops[0]), ("global2", crops[1]), ("local", torch.cat(crops[2:]))):
        params = augment.draw_params(group, len(crop), torch.Generator().manual_seed(3))
        on_cuda = type(params)(**{k: v.cuda() for k, v in vars(params).items()})
        torch.testing.assert_close(augment.apply(group, crop.cuda(), on_cuda).cpu(), augment.apply(group, crop, params),
                                   rtol=0, atol=1e-4)
    augment(cuda_crops, cuda_generator.manual_seed(1))  # warm-up
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        first = augment(cuda_crops, cuda_generator.manual_seed(1))
    finally:
        torch.cuda.set_sync_debug_mode("default")
    again = augment(cuda_crops, cuda_generator.manual_seed(1))
    assert all(torch.equal(a, b) for a, b in zip(first, again))


# --- worker side -----------------------------------------------------------------------------------------

def torchvision_crops(image, augment, seed):
    """torchvision's RandomResizedCrop (bicubic) + RandomHorizontalFlip on PIL, crop after crop, as uint8."""
    torch.manual_seed(seed)
    crops = []
    for size, scale in augment.views:
        chain = transforms.Compose([
            transforms.RandomResizedCrop(size, scale=scale, interpolation=transforms.InterpolationMode.BICUBIC),
            transforms.RandomHorizontalFlip(), transforms.PILToTensor()])
        crops.append(chain(image))
    return crops


@pytest.mark.parametrize("seed", range(4))
def test_worker_crops_equal_torchvision_on_png(seed):
    """Same seed, same boxes and flips. The resize is torch's uint8 antialiased bicubic, PIL's filter with
    16-bit instead of 22-bit fixed-point weights: each of its two passes may round one grey level away from
    PIL, so a pixel may end up 2 levels off (measured: 0.3% of pixels differ, by 1 almost always)."""
    image = photo_like(160, 120, seed)
    png = encoded(image, "PNG")
    augment = MultiCropUint8(**SIZES)
    torch.manual_seed(seed)
    ours = augment(Image.open(io.BytesIO(png)))  # opened lazily, as a dataset should hand it over
    reference = torchvision_crops(image, augment, seed)
    assert len(ours) == 2 + SIZES["local_crops_number"]
    for crop, expected in zip(ours, reference):
        assert crop.dtype == torch.uint8 and crop.shape == expected.shape
        difference = (crop.int() - expected.int()).abs()
        assert difference.max() <= 2 and (difference > 1).float().mean() < 1e-3
        assert difference.float().mean() < 0.02


def test_jpeg_draft_decodes_reduced_and_stays_close_to_full_decode():
    """A 1200x900 JPEG cut into 64/32 px crops allows a 1/4 or 1/8 DCT decode. The reduced decode averages
    8x8 blocks where the full one resamples bicubic, and the scaled boxes are rounded to whole reduced pixels:
    on this textured image each crop stays within a mean of 2.5 grey levels of the full-decode crop."""
    data = encoded(photo_like(1200, 900, 1), "JPEG", quality=95)
    augment = MultiCropUint8(local_crops_number=4, global_crop_size=64, local_crop_size=32)
    for seed in range(3):
        torch.manual_seed(seed)
        boxes = augment.draw_boxes(Image.open(io.BytesIO(data)))
        reduction = jpeg_reduction(boxes)
        assert reduction in (4, 8)
        assert all(min(b.height, b.width) >= reduction * b.size for b in boxes)
        pixels, used = decode_for_boxes(Image.open(io.BytesIO(data)), boxes)
        assert used == reduction and tuple(pixels.shape) == (1, 3, -(-900 // reduction), -(-1200 // reduction))
        loaded = Image.open(io.BytesIO(data))
        loaded.load()  # too late for draft: decoded at full size
        assert decode_for_boxes(loaded, boxes)[1] == 1
        torch.manual_seed(seed)
        drafted = augment(Image.open(io.BytesIO(data)))
        torch.manual_seed(seed)
        full = augment(loaded)
        for crop, reference in zip(drafted, full):
            assert crop.shape == reference.shape and crop.dtype == torch.uint8
            assert (crop.float() - reference.float()).abs().mean() < 2.5


def test_no_draft_when_a_crop_needs_full_resolution():
    augment = MultiCropUint8(local_crops_number=2, global_crop_size=224, local_crop_size=96)
    torch.manual_seed(0)
    assert jpeg_reduction(augment.draw_boxes(photo_like(640, 427))) == 1


@pytest.mark.parametrize("mode", ["L", "RGBA", "P"])
def test_both_chains_take_non_rgb_and_small_images(mode):
    image = photo_like(20, 14).convert(mode)  # smaller than the global crop: up-sampled
    for transform, dtype in ((MultiCropUint8, torch.uint8), (DataAugmentationDINO, torch.float32)):
        crops = transform(local_crops_number=1, global_crop_size=32, local_crop_size=16)(image)
        assert [tuple(c.shape) for c in crops] == [(3, 32, 32), (3, 32, 32), (3, 16, 16)]
        assert all(c.dtype == dtype for c in crops)


class LazyImages(Dataset):
    def __init__(self, files, transform):
        self.files, self.transform = files, transform

    def __len__(self):
        return len(self.files)

    def __getitem__(self, index):
        return self.transform(Image.open(io.BytesIO(self.files[index])))


def test_loader_collates_uint8_batches_reproducibly_across_workers():
    files = [encoded(photo_like(80, 60, seed), "JPEG", quality=90) for seed in range(4)]
    dataset = LazyImages(files, MultiCropUint8(local_crops_number=2, global_crop_size=32, local_crop_size=16))

    def batches():
        loader = DataLoader(dataset, batch_size=2, num_workers=2, generator=torch.Generator().manual_seed(3))
        return list(loader)

    first, again = batches(), batches()
    assert [tuple(c.shape) for c in first[0]] == [(2, 3, 32, 32)] * 2 + [(2, 3, 16, 16)] * 2
    assert all(c.dtype == torch.uint8 for batch in first for c in batch)
    assert all(torch.equal(a, b) for x, y in zip(first, again) for a, b in zip(x, y))
    views = DeviceAugmentation(2, 32)(first[0], torch.Generator().manual_seed(0))
    assert [v.dtype for v in views] == [torch.float32] * 4


# --- the reference chain ---------------------------------------------------------------------------------

def test_reference_chain_shapes_and_reproducibility():
    augment = DataAugmentationDINO(**SIZES)
    image = photo_like()
    torch.manual_seed(1)
    first = augment(image)
    torch.manual_seed(1)
    again = augment(image)
    assert [tuple(c.shape) for c in first] == [(3, 48, 48)] * 2 + [(3, 24, 24)] * 4
    assert all(c.dtype == torch.float32 for c in first)
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert not torch.allclose(first[0], first[1])


def test_reference_chain_normalises_untouched_pixels():
    """A flat grey image stays flat under crops, flips, jitter (hue and saturation of grey are no-ops) and
    blur, so each crop is (grey / 255 - mean) / std, or a solarised / brightness-scaled grey."""
    mean, std = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)
    torch.manual_seed(0)
    crops = DataAugmentationDINO(local_crops_number=3, global_crop_size=32, local_crop_size=16)(
        Image.new("RGB", (40, 40), (128, 128, 128)))
    for crop in crops:
        values = crop * std + mean
        assert torch.allclose(values, values[:, :1, :1].expand_as(values), atol=1e-6)  # still flat
        assert torch.allclose(values[:, 0, 0], values[0, 0, 0].expand(3), atol=1e-6)  # still grey
