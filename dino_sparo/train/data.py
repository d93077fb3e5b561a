"""The training data of a DINO run: the image folder through the multi-crop transform, the resumable distributed
sampler, the loader, and what turns a batch into the step's views on the training device."""
from __future__ import annotations

import logging
from dataclasses import dataclass

from torch.utils.data import DataLoader

from ..data.augment import DataAugmentationDINO, MultiCropUint8
from ..data.datasets import ImageDataset, ResumableDistributedSampler
from ..data.device_augment import DeviceAugmentation, StepViews
from ..distributed import DistributedContext, resolve_device
from ..errors import UserError
from .config import TrainConfig
from .preemption import ignore_preemption_signals

logger = logging.getLogger(__name__)


@dataclass
class TrainingData:
    sampler: ResumableDistributedSampler
    loader: DataLoader
    views: StepViews

    @property
    def num_images(self) -> int:
        return len(self.sampler.dataset)


def build_training_data(config: TrainConfig, ctx: DistributedContext) -> TrainingData:
    """The loader of multi-crop batches (drop_last, as the reference) over a sampler that resumes inside an epoch.

    ``--augment_device pil`` runs the reference chain in the workers. Otherwise (the default) workers only
    decode, crop, resize and flip to uint8, and the colour, blur and solarisation ops run batched on
    ``--augment_device``. Workers live for the whole run (``persistent_workers``): the sampler, which hands them
    indices and seeds from the main process, still follows each epoch's ``set_epoch`` and ``samples_done``.
    """
    crop_args = (config.global_crops_scale, config.local_crops_scale, config.local_crops_number,
                 config.global_crop_size, config.local_crop_size)
    if config.augment_device == "pil":
        transform, augmentation, augment_device = DataAugmentationDINO(*crop_args), None, ctx.device
    else:
        transform = MultiCropUint8(*crop_args)
        augmentation = DeviceAugmentation(config.local_crops_number, config.global_crop_size)
        augment_device = (ctx.device if config.augment_device == ctx.device.type
                          else resolve_device(config.augment_device, ctx.local_rank, "--augment_device"))
    views = StepViews(augmentation, augment_device, ctx.device, config.seed, ctx.rank)
    dataset = ImageDataset(config.data_path, transform, count_skipped=True)
    sampler = ResumableDistributedSampler(dataset, num_replicas=ctx.world_size, rank=ctx.rank, shuffle=True,
                                          seed=config.seed, seed_samples=True)
    loader = DataLoader(dataset, sampler=sampler, batch_size=config.batch_size_per_gpu,
                        num_workers=config.num_workers, pin_memory=ctx.device.type == "cuda", drop_last=True,
                        persistent_workers=config.num_workers > 0, worker_init_fn=ignore_preemption_signals)
    if len(loader) == 0:
        raise UserError(f"{len(dataset)} images are fewer than one batch of {config.batch_size_per_gpu} x "
                        f"{ctx.world_size} processes: lower --batch_size_per_gpu")
    layout = f"{len(dataset.classes)} class folders" if dataset.classes else "flat folder"
    logger.info(f"data: {len(dataset)} images in {config.data_path} ({layout}); {len(loader)} iterations per epoch")
    if dataset.ignored_loose_files:
        logger.info(f"note: {dataset.ignored_loose_files} images directly in {config.data_path} are ignored because "
                    f"it has class sub-folders")
    return TrainingData(sampler, loader, views)
