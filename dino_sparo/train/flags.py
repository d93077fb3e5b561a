"""main_dino.py's flags: facebookresearch/dino's, with its names and defaults, and this project's. Defaults that
depend on other flags or on the machine are None here and decided by :func:`~.config.resolve_config`."""
from __future__ import annotations

import argparse

from ..cli import (
    BARE_IS_TRUE,
    ArgumentParser,
    HelpFormatter,
    block_count_or_all,
    bool_flag,
    flag_names,
    non_negative_int,
    positive_int,
)
from ..models.flags import add_model_args

PRECISIONS = ("auto", "fp32", "fp16", "bf16")
AUGMENT_DEVICES = ("auto", "pil", "cpu", "cuda")
OPTIMIZERS = ("adamw", "sgd", "lars")


def get_args_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog="main_dino.py", description="DINO pretraining with a SPARO read-out",
                            formatter_class=HelpFormatter)
    parser.add_argument("--config", dest="config_file", default=None, metavar="FILE",
                        help="a recipe: a YAML file of flag values (or the name of one in configs/, e.g. "
                        "vits16_1gpu); flags given on the command line override it")
    add_model_args(parser)
    group = parser.add_argument_group("DINO head and loss")
    group.add_argument("--out_dim", type=positive_int, default=65536, help="dimensionality of the DINO head output")
    group.add_argument("--norm_last_layer", type=bool_flag, **BARE_IS_TRUE, default=True,
                       help="fix the norm of the head's last layer to 1 (false: more accurate but less stable)")
    group.add_argument("--momentum_teacher", type=float, default=0.996,
                       help="base EMA momentum of the teacher, cosine-scheduled to 1 (0.9995 for batch 256)")
    group.add_argument("--use_bn_in_head", type=bool_flag, **BARE_IS_TRUE, default=False, help="BatchNorm in the head")
    group.add_argument("--head_hidden_dim", type=positive_int, default=2048, help="width of the head's MLP")
    group.add_argument("--head_bottleneck_dim", type=positive_int, default=256,
                       help="size of the head's L2-normalised bottleneck")
    group.add_argument("--warmup_teacher_temp", type=float, default=0.04, help="teacher temperature at epoch 0")
    group.add_argument("--teacher_temp", type=float, default=0.04,
                       help="teacher temperature after warm-up (above 0.07 tends to be unstable)")
    group.add_argument("--warmup_teacher_temp_epochs", type=non_negative_int, default=0,
                       help="epochs of teacher temperature warm-up")

    group = parser.add_argument_group("optimisation")
    group.add_argument("--precision", choices=PRECISIONS, default="auto",
                       help="auto: bf16 autocast where bf16 is native (CUDA GPUs from Ampere on, CPUs with "
                       "AVX512-BF16 or AMX), fp16 + GradScaler on older GPUs (V100, T4), else fp32; fp16 needs CUDA")
    group.add_argument("--use_fp16", type=bool_flag, **BARE_IS_TRUE, default=None,
                       help="reference flag: true = --precision fp16, false = --precision fp32 (when --precision "
                       "is auto)")
    group.add_argument("--weight_decay", type=float, default=0.04, help="initial weight decay")
    group.add_argument("--weight_decay_end", type=float, default=0.4, help="final weight decay (cosine schedule)")
    group.add_argument("--clip_grad", type=float, default=3.0, help="per-parameter gradient norm clip; 0 disables")
    group.add_argument("--batch_size_per_gpu", type=positive_int, default=64,
                       help="images per process and forward pass")
    group.add_argument("--accum_steps", type=positive_int, default=1,
                       help="gradient accumulation: forward passes per optimizer step, so the effective batch is "
                       "accum_steps x batch_size_per_gpu x processes; the loss is averaged over it, the teacher's "
                       "center and EMA move once per optimizer step, and every schedule and --lr's batch scaling "
                       "count optimizer steps")
    group.add_argument("--epochs", type=positive_int, default=100, help="training epochs")
    group.add_argument("--freeze_last_layer", type=non_negative_int, default=1,
                       help="epochs during which the head's last layer is not updated")
    group.add_argument("--lr", type=float, default=0.0005,
                       help="peak learning rate for a global batch of 256 (scaled linearly with the batch)")
    group.add_argument("--warmup_epochs", type=non_negative_int, default=10,
                       help="epochs of linear learning-rate warm-up")
    group.add_argument("--min_lr", type=float, default=1e-6, help="final learning rate (cosine schedule)")
    group.add_argument("--optimizer", choices=OPTIMIZERS, default="adamw", help="optimizer")
    group.add_argument("--drop_path_rate", type=float, default=0.1, help="stochastic depth of the student")
    group.add_argument("--compile", type=bool_flag, **BARE_IS_TRUE, default=False,
                       help="torch.compile each transformer block of student and teacher (regional compilation); "
                       "checkpoints are unchanged")

    group = parser.add_argument_group("multi-crop")
    group.add_argument("--global_crops_scale", type=float, nargs=2, default=(0.4, 1.0),
                       help="area range of the global crops ((0.14, 1) when --local_crops_number 0)")
    group.add_argument("--local_crops_number", type=non_negative_int, default=8,
                       help="local crops per image; 0 disables")
    group.add_argument("--local_crops_scale", type=float, nargs=2, default=(0.05, 0.4),
                       help="area range of local crops")
    group.add_argument("--global_crop_size", type=positive_int, default=224, help="side of the global crops in px")
    group.add_argument("--local_crop_size", type=positive_int, default=None,
                       help="side of the local crops in px (default: DINO's 96 as the nearest multiple of the "
                       "patch size, 98 for patch 14 as DINOv2)")
    group.add_argument("--augment_device", choices=AUGMENT_DEVICES, default="auto",
                       help="where colour jitter, grayscale, blur, solarisation and normalisation run: batched on "
                       "cpu or cuda (auto: the training device; workers then only decode, crop, resize and flip to "
                       "uint8), or pil: the reference's per-image PIL chain in the workers")

    group = parser.add_argument_group("data, output and start")
    group.add_argument("--data_path", default=None,
                       help="image folder: class sub-folders (ImageFolder layout) or images directly in it")
    group.add_argument("--output_dir", default=".", help="checkpoints, log.txt and TensorBoard events; a "
                       "checkpoint.pth found here is resumed")
    group.add_argument("--saveckp_freq", type=non_negative_int, default=20,
                       help="also keep checkpointNNNN.pth every N epochs; 0: never")
    group.add_argument("--init_from", default=None,
                       help="start the student and teacher from these weights (this project's, an official DINO, "
                       "DINOv2 or DINOv3 checkpoint, timm's, or an export; backbone, and the head when it fits); "
                       "ignored when output_dir has a checkpoint")
    group.add_argument("--init_from_key", default="teacher", help="which weights of --init_from to use")
    group.add_argument("--freeze_blocks", type=block_count_or_all, default=None,
                       help="retrofit a read-out onto a trained model: freeze the patch and position embeddings, the "
                       "CLS token and the first K blocks (all: every block before the read-out), typically with "
                       "--init_from and --readout sparo. Only the read-out, the head and unfrozen blocks train; the "
                       "frozen blocks run once per crop, shared by student and teacher, without stochastic depth "
                       "(default: nothing frozen)")
    group.add_argument("--unfreeze_at", type=positive_int, default=None, metavar="EPOCH",
                       help="continued training's second stage: at the start of this epoch (as --freeze_last_layer "
                       "counts epochs) the blocks, embeddings and tokens --freeze_blocks froze train too, with a "
                       "learning rate of their own (--backbone_lr, after --unfreeze_warmup); needs --freeze_blocks "
                       "(default: frozen to the end)")
    group.add_argument("--backbone_lr", type=float, default=5e-5,
                       help="peak learning rate of the unfrozen backbone for a global batch of 256, scaled as --lr "
                       "(5e-5: the FINO recipe of DINOv3's authors); it then follows the cosine of --lr")
    group.add_argument("--unfreeze_warmup", type=non_negative_int, default=1000, metavar="ITERATIONS",
                       help="optimizer steps over which the unfrozen backbone's learning rate ramps linearly from 0 "
                       "to --backbone_lr")
    group.add_argument("--layerwise_decay", type=float, default=1.0,
                       help="layer-wise learning-rate decay of the unfrozen backbone, as DINOv2's: block i of n gets "
                       "decay^(n - i) times the backbone's rate, the embeddings decay^(n + 1); 1: none")
    group.add_argument("--seed", type=int, default=0, help="random seed")
    group.add_argument("--num_workers", type=non_negative_int, default=10,
                       help="data-loading processes per training process")
    group.add_argument("--log_freq", type=positive_int, default=10, help="iterations between progress lines")
    group.add_argument("--viz_freq", type=non_negative_int, default=5,
                       help="read-outs with attention maps: every epoch the slot statistics of the teacher on 16 "
                       "fixed training images go to log.txt and TensorBoard; every viz_freq epochs also their most "
                       "peaked maps (TensorBoard images); 0: no images")
    group.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    group.add_argument("--dist_url", default="env://", help="process-group initialisation URL")
    group.add_argument("--dist_timeout", type=float, default=None,
                       help="seconds a collective waits for the other processes before the job ends with an error "
                       "naming the likely cause (default: torch's, 30 min for gloo, 10 min for NCCL)")
    group.add_argument(*flag_names("--local_rank"), type=int, default=0,
                       help="set by legacy launchers; torchrun's LOCAL_RANK variable takes precedence")

    group = parser.add_argument_group("end-of-training k-NN and the built-in demo")
    group.add_argument("--knn_data_path", default=None,
                       help="folder with train/ and val/ class sub-folders: print the teacher's k-NN top-1 on val "
                       "(and that of the initial model) after training, with DINO's protocol (k 20, temperature "
                       "0.07) on the evaluation view of the global crops (resize global_crop_size x 256/224, centre "
                       "crop); eval_knn.py does the rest")
    group.add_argument("--demo", action="store_true",
                       help="the built-in demo: the recipe configs/demo.yaml on the generated shapes data set; any "
                       "flag given explicitly overrides the recipe")
    group.add_argument("--demo_data_dir", default=None,
                       help="where the demo data set is generated (default: $DINO_SPARO_CACHE/demo or "
                       "~/.cache/dino_sparo/demo)")
    group.add_argument("--demo_num_images", type=positive_int, default=2000,
                       help="training images of the demo set (plus a quarter as many for validation)")
    return parser
