"""The suspected causes of slots that do not specialise, measured rather than assumed.

    python -m experiments.slot_causes --out experiments/results/slot_ablation   (after experiments.slot_ablation)

1. Initial temperature: the spread (std over tokens) of each slot's attention logits at initialisation, for the
   demo architecture and for ViT-S/16 with the package's defaults of the time (L = 64, H = 64), with key gain 1 and 4.
   The logits' spread is read off the attention maps (log a_ln differs from the logit by a per-row constant).
2. Adam's step size: how far training moved the SPARO queries and key projection (norm ratio trained / initial, and
   relative change) for the paper's read-out (the ablation's ``default``) and a x10 read-out learning rate, at the
   ablation's budget (seed 0, the training part of each set), and the logit spread after training. (Weight decay
   was measured too at commit 9668c67, with ``--sparo_weight_decay false``; that flag has since been removed as
   inert.)
The runs use the ablation's data sets and recipe (``OUT/causes``; checkpoints are removed once measured); the
numbers go to ``OUT/slot_causes.json``.
"""
from __future__ import annotations

import argparse
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from dino_sparo.models import ModelConfig, build_backbone
from dino_sparo.utils.files import write_json_atomic

from .base.data import DataSet, prepare_demo, prepare_digits
from .base.evaluation import CROP_SIZE, RESIZE_SIZE, image_batches, knn_run, teacher_backbone
from .base.report import study_command
from .base.runs import PAPER_SPARO, Configuration, training_run

IMAGES = 64
TRAINED_CONFIGS = (Configuration("default", PAPER_SPARO, "the paper's read-out (the ablation's default)"),
                   Configuration("lr_mult_10", {**PAPER_SPARO, "sparo_lr_mult": 10}, "read-out learning rate x10"))
# ViT-S/16 with SPARO as the package's defaults were when measured, stated so that a change of a default cannot
# change the figure (the key gain is set per measurement).
VIT_SMALL_SPARO = {"arch": "vit_small", "patch_size": 16, "depth": 12, "readout": "sparo", "readout_replace_blocks": 1,
                   "sparo_slots": 64, "sparo_slot_dim": 64, "sparo_attn_dim": 64, "sparo_query_init_std": 1.0}


def load_images(folder: Path, resize_size: int, crop_size: int) -> torch.Tensor:
    """Up to :data:`IMAGES` images of ``folder``, evenly spaced, in the evaluation view."""
    return next(image_batches(folder, IMAGES, resize_size, crop_size, batch_size=IMAGES))


@torch.no_grad()
def logit_spread(backbone: torch.nn.Module, images: torch.Tensor) -> float:
    """Mean over images and slots of the std over tokens of the attention logits."""
    backbone.eval()
    attention = backbone.get_slot_attention(images).float()
    return float(attention.clamp_min(1e-30).log().std(dim=-1).mean())


def readout_tensors(state: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """The SPARO queries and key-projection weight of a backbone state dict."""
    return state["sparo.queries"], state["sparo.key_proj.weight"]


def movement(data_set: DataSet, config: Configuration, epochs: int, out: Path, images: torch.Tensor
             ) -> dict[str, Any]:
    """Trains ``config`` (seed 0, the ablation's budget) and compares its teacher's read-out with the initial one."""
    run_dir = out / "causes" / data_set.name / config.name
    checkpoint = run_dir / "checkpoint.pth"
    if not checkpoint.is_file():  # measured before (the checkpoint is removed) or never run: train from scratch
        shutil.rmtree(run_dir, ignore_errors=True)
    result = knn_run(data_set, config, 0, epochs, run_dir, per_slot=True, statistics_at_init=True,
                     keep_checkpoint=True)
    start = training_run(data_set, run_dir, 0, epochs, config.flags).initial_backbone()
    trained = teacher_backbone(checkpoint)
    checkpoint.unlink()
    (query_0, key_0), (query_t, key_t) = readout_tensors(start.state_dict()), readout_tensors(trained.state_dict())
    return {"data_set": data_set.name, "config": config.name,
            "query_norm_ratio": float(query_t.norm() / query_0.norm()),
            "query_relative_change": float((query_t - query_0).norm() / query_0.norm()),
            "key_norm_ratio": float(key_t.norm() / key_0.norm()),
            "key_relative_change": float((key_t - key_0).norm() / key_0.norm()),
            "logit_spread_init": logit_spread(start, images), "logit_spread_trained": logit_spread(trained, images),
            "holdout_peakedness_init": result["holdout_at_init"]["slot_peakedness"],
            "holdout_peakedness_trained": result["holdout"]["statistics"]["slot_peakedness"]}


def initial_spreads(demo: DataSet, digits: DataSet) -> list[dict[str, Any]]:
    """Logit spread at initialisation (seed 0) for the demo architecture and ViT-S/16 defaults, key gain 1 and 4."""
    rows = []
    for data_set in (demo, digits):
        images = load_images(data_set.root / "holdout", RESIZE_SIZE, CROP_SIZE)
        for gain in (1.0, 4.0):
            run = training_run(data_set, Path("unused"), 0, 1, {**PAPER_SPARO, "sparo_key_init_gain": gain})
            rows.append({"model": "demo recipe (ViT-Tiny/8, depth 3, L=16, H=16)", "images": data_set.name,
                         "key_gain": gain, "logit_spread": logit_spread(run.initial_backbone(), images)})
    images = load_images(demo.root / "holdout", 256, 224)
    for gain in (1.0, 4.0):
        torch.manual_seed(0)
        backbone = build_backbone(ModelConfig.resolve({**VIT_SMALL_SPARO, "sparo_key_init_gain": gain}))
        rows.append({"model": "package defaults (ViT-S/16, depth 12, L=64, H=64)", "images": "demo at 224 px",
                     "key_gain": gain, "logit_spread": logit_spread(backbone, images)})
    return rows


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("experiments/results/slot_ablation"),
                        help="the ablation's folder (its data sets are reused; runs go to OUT/causes)")
    parser.add_argument("--demo_epochs", type=int, default=6, help="as the ablation")
    parser.add_argument("--digits_epochs", type=int, default=10, help="as the ablation")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (see the ablation)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    out = args.out.resolve()
    demo, digits = prepare_demo(out / "data"), prepare_digits(out / "data")
    epochs = {"demo": args.demo_epochs, "digits": args.digits_epochs}
    spreads = initial_spreads(demo, digits)
    for row in spreads:
        print(f"logit spread at init: {row['model']}, {row['images']} images, key gain {row['key_gain']:g}: "
              f"{row['logit_spread']:.3f}", flush=True)
    moved = []
    for data_set in (demo, digits):
        images = load_images(data_set.root / "holdout", RESIZE_SIZE, CROP_SIZE)
        for config in TRAINED_CONFIGS:
            row = movement(data_set, config, epochs[data_set.name], out, images)
            moved.append(row)
            print(f"{data_set.name:7s} {config.name:16s} queries: norm x{row['query_norm_ratio']:.3f}, moved "
                  f"{row['query_relative_change']:.3f} of their norm; key projection: norm x{row['key_norm_ratio']:.3f}"
                  f", moved {row['key_relative_change']:.3f}; logit spread {row['logit_spread_init']:.3f} -> "
                  f"{row['logit_spread_trained']:.3f}; holdout peakedness {row['holdout_peakedness_init']:.3f} -> "
                  f"{row['holdout_peakedness_trained']:.3f}", flush=True)
    summary = {"command": study_command("slot_causes", argv), "initial_logit_spread": spreads, "movement": moved}
    write_json_atomic(summary, out / "slot_causes.json")
    return summary


if __name__ == "__main__":
    main()
