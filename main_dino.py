"""DINO pretraining with a SPARO read-out. Single process: ``python main_dino.py --data_path DIR``;
several: ``torchrun --nproc_per_node N main_dino.py ...``; built-in demo: ``python main_dino.py --demo``.

Exit status: 0 done, 1 non-finite loss, 2 bad input (also an output folder that cannot be written, or out of device
memory), 3 preempted (state saved: run the same command again), 4 another process of the job died or stopped
responding (run the same command again).
"""
from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from typing import Any

from dino_sparo.cli import block_count_or_all, bool_flag, positive_int
from dino_sparo.distributed import destroy_distributed
from dino_sparo.errors import run_cli
from dino_sparo.models.config import add_model_args
from dino_sparo.train import train_dino
from dino_sparo.train.setup import AUGMENT_DEVICES, PRECISIONS, with_model_config

# The built-in demo: a small model and a recipe that learns visibly on the generated images within a few CPU
# minutes (about 300 steps). DINO's ImageNet defaults collapse or barely move on a few thousand tiny images (the
# loss pinned at ln(out_dim), as in facebookresearch/dino issue 246): a sharper teacher (0.02) keeps it from
# drifting to uniform, and a fast teacher (momentum 0.97) lets the evaluated teacher follow a student that trains
# for so few steps.
DEMO_PRESET: dict[str, Any] = dict(
    arch="vit_tiny", patch_size=8, depth=3, sparo_slots=16, sparo_slot_dim=16, sparo_attn_dim=16,
    out_dim=1024, head_hidden_dim=512, head_bottleneck_dim=128, momentum_teacher=0.97, teacher_temp=0.02,
    warmup_teacher_temp=0.02, warmup_teacher_temp_epochs=0, lr=0.004, min_lr=1e-5, warmup_epochs=1,
    weight_decay=0.04, weight_decay_end=0.1, epochs=10, batch_size_per_gpu=32, drop_path_rate=0.0,
    freeze_last_layer=1, global_crop_size=32, local_crop_size=16, local_crops_number=2,
    global_crops_scale=(0.4, 1.0), local_crops_scale=(0.1, 0.4), num_workers=2, saveckp_freq=0,
    output_dir=os.path.join("runs", "demo"), precision="fp32", log_freq=20,
)


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="DINO pretraining with a SPARO read-out", add_help=True,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_model_args(parser, from_checkpoint=False)
    group = parser.add_argument_group("DINO head and loss")
    group.add_argument("--out_dim", type=positive_int, default=65536, help="dimensionality of the DINO head output")
    group.add_argument("--norm_last_layer", type=bool_flag, default=True,
                       help="fix the norm of the head's last layer to 1 (false: more accurate but less stable)")
    group.add_argument("--momentum_teacher", type=float, default=0.996,
                       help="base EMA momentum of the teacher, cosine-scheduled to 1 (0.9995 for batch 256)")
    group.add_argument("--use_bn_in_head", type=bool_flag, default=False, help="BatchNorm in the head MLP")
    group.add_argument("--head_hidden_dim", type=positive_int, default=2048, help="width of the head's MLP")
    group.add_argument("--head_bottleneck_dim", type=positive_int, default=256,
                       help="size of the head's L2-normalised bottleneck")
    group.add_argument("--warmup_teacher_temp", type=float, default=0.04, help="teacher temperature at epoch 0")
    group.add_argument("--teacher_temp", type=float, default=0.04,
                       help="teacher temperature after warm-up (above 0.07 tends to be unstable)")
    group.add_argument("--warmup_teacher_temp_epochs", type=int, default=0,
                       help="epochs of teacher temperature warm-up")

    group = parser.add_argument_group("optimisation")
    group.add_argument("--precision", choices=PRECISIONS, default="auto",
                       help="auto: bf16 autocast where bf16 is native (CUDA GPUs from Ampere on, CPUs with "
                       "AVX512-BF16 or AMX), fp16 + GradScaler on older GPUs (V100, T4), else fp32; fp16 needs CUDA")
    group.add_argument("--use_fp16", type=bool_flag, default=None,
                       help="reference flag: true = --precision fp16, false = --precision fp32 (when --precision "
                       "is auto)")
    group.add_argument("--weight_decay", type=float, default=0.04, help="initial weight decay")
    group.add_argument("--weight_decay_end", type=float, default=0.4, help="final weight decay (cosine schedule)")
    group.add_argument("--clip_grad", type=float, default=3.0, help="per-parameter gradient norm clip; 0 disables")
    group.add_argument("--batch_size_per_gpu", type=positive_int, default=64, help="images per process and step")
    group.add_argument("--epochs", type=positive_int, default=100, help="training epochs")
    group.add_argument("--freeze_last_layer", type=int, default=1,
                       help="epochs during which the head's last layer is not updated")
    group.add_argument("--lr", type=float, default=0.0005,
                       help="peak learning rate for a global batch of 256 (scaled linearly with the batch)")
    group.add_argument("--warmup_epochs", type=int, default=10, help="epochs of linear learning-rate warm-up")
    group.add_argument("--min_lr", type=float, default=1e-6, help="final learning rate (cosine schedule)")
    group.add_argument("--optimizer", choices=("adamw", "sgd", "lars"), default="adamw", help="optimizer")
    group.add_argument("--drop_path_rate", type=float, default=0.1, help="stochastic depth of the student")
    group.add_argument("--compile", type=bool_flag, default=False,
                       help="torch.compile each transformer block of student and teacher (regional: one graph per "
                       "crop resolution, shared by the blocks); checkpoints are unchanged")

    group = parser.add_argument_group("multi-crop")
    group.add_argument("--global_crops_scale", type=float, nargs=2, default=(0.4, 1.0),
                       help="area range of the global crops ((0.14, 1) when --local_crops_number 0)")
    group.add_argument("--local_crops_number", type=int, default=8, help="local crops per image; 0 disables")
    group.add_argument("--local_crops_scale", type=float, nargs=2, default=(0.05, 0.4),
                       help="area range of local crops")
    group.add_argument("--global_crop_size", type=positive_int, default=224, help="side of the global crops in px")
    group.add_argument("--augment_device", choices=AUGMENT_DEVICES, default="auto",
                       help="where colour jitter, grayscale, blur, solarisation and normalisation run: batched on "
                       "cpu or cuda (auto: the training device; workers then only decode, crop, resize and flip to "
                       "uint8), or pil: the reference's per-image PIL chain in the workers")
    group.add_argument("--local_crop_size", type=positive_int, default=None,
                       help="side of the local crops in px; None: DINO's 96 as the nearest multiple of the patch size "
                       "(98 for patch 14, as DINOv2)")

    group = parser.add_argument_group("data, output and start")
    group.add_argument("--data_path", default=None,
                       help="image folder: class sub-folders (ImageFolder layout) or images directly in it")
    group.add_argument("--output_dir", default=".", help="checkpoints, log.txt and TensorBoard events; a "
                       "checkpoint.pth found here is resumed")
    group.add_argument("--saveckp_freq", type=int, default=20,
                       help="also keep checkpointNNNN.pth every N epochs; 0: never")
    group.add_argument("--init_from", default=None,
                       help="start the student and teacher from these weights (this project's or an official DINO "
                       "checkpoint; backbone, and the head when it fits); ignored when output_dir has a checkpoint")
    group.add_argument("--init_from_key", default="teacher", help="which weights of --init_from to use")
    group.add_argument("--freeze_blocks", type=block_count_or_all, default=None,
                       help="retrofit a read-out onto a trained model: freeze the patch and position embeddings, the "
                       "CLS token and the first K blocks (all: every block before the read-out), typically with "
                       "--init_from a DINO checkpoint and --readout sparo. Only the read-out, the head and unfrozen "
                       "blocks train; the frozen blocks run once per crop, shared by student and teacher, and "
                       "stochastic depth is off inside them (default: nothing frozen)")
    group.add_argument("--seed", type=int, default=0, help="random seed")
    group.add_argument("--num_workers", type=int, default=10, help="data-loading processes per training process")
    group.add_argument("--log_freq", type=positive_int, default=10, help="iterations between progress lines")
    group.add_argument("--viz_freq", type=int, default=5,
                       help="SPARO: every epoch the slot statistics of the teacher on 16 fixed training images go to "
                       "log.txt and TensorBoard; every viz_freq epochs also their most peaked slots' attention maps "
                       "(TensorBoard images); 0: no images")
    group.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    group.add_argument("--dist_url", default="env://", help="process-group initialisation URL")
    group.add_argument("--dist_timeout", type=float, default=None,
                       help="seconds a collective waits for the other processes before the job ends with an error "
                       "naming the likely cause (default: torch's, 30 min for gloo, 10 min for NCCL)")
    group.add_argument("--local_rank", "--local-rank", type=int, default=0,
                       help="set by legacy launchers; torchrun's LOCAL_RANK variable takes precedence")

    group = parser.add_argument_group("end-of-training k-NN and the built-in demo")
    group.add_argument("--knn_data_path", default="",
                       help="folder with train/ and val/ class sub-folders: print the teacher's k-NN top-1 on val "
                       "(and that of the initial model) after training")
    group.add_argument("--knn_k", type=positive_int, default=20, help="neighbours of the final k-NN")
    group.add_argument("--knn_temperature", type=float, default=0.07, help="temperature of the k-NN vote")
    group.add_argument("--knn_resize_size", type=positive_int, default=None,
                       help="k-NN resize side (default: global_crop_size * 256 / 224)")
    group.add_argument("--knn_crop_size", type=positive_int, default=None,
                       help="k-NN centre-crop side (default: global_crop_size)")
    group.add_argument("--demo", action="store_true",
                       help="the built-in demo: generated shapes data set and a small tuned recipe; any flag given "
                       "explicitly overrides the preset")
    group.add_argument("--demo_data_dir", default=None,
                       help="where the demo data set is generated (default: $DINO_SPARO_CACHE/demo or "
                       "~/.cache/dino_sparo/demo)")
    group.add_argument("--demo_num_images", type=positive_int, default=2000,
                       help="training images of the demo set (plus a quarter as many for validation)")
    return parser


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parses flags; with ``--demo`` the demo preset replaces the defaults, explicit flags still win. What the arch
    decides (``--patch_size``, ``--depth``, ... left out) is filled in."""
    parser = get_args_parser()
    args = parser.parse_args(argv)
    if args.demo:
        parser.set_defaults(**DEMO_PRESET)
        args = parser.parse_args(argv)
    return with_model_config(args)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    try:
        train_dino(args)
    finally:
        destroy_distributed()


if __name__ == "__main__":
    run_cli(main)
