import dataclasses
import json
import math
import os
import shutil

import pytest
import torch
from helpers import make_images, tiny_config

from dino_sparo.checkpoint import save_atomic
from dino_sparo.distributed import DistributedContext
from dino_sparo.errors import UserError
from dino_sparo.loss import DINOLoss
from dino_sparo.optim import (
    build_optimizer,
    cancel_gradients_last_layer,
    clip_gradients,
    get_params_groups,
    update_teacher,
)
from dino_sparo.train import train_dino
from dino_sparo.train.build import build_models
from dino_sparo.train.config import parse_config, resolve_precision
from dino_sparo.train.health import warn_if_collapsed
from dino_sparo.train.metrics import TrainingLog
from dino_sparo.train.state import TrainState
from dino_sparo.train.trainer import _resume_or_initialise


def test_models_teacher_is_a_separate_copy():
    args = tiny_config("unused", "unused", "--drop_path_rate", "0.2", "--norm_last_layer", "false")
    student, teacher = build_models(args, torch.device("cpu"))
    student_ptrs = {p.untyped_storage().data_ptr() for p in student.parameters()}
    assert all(p.untyped_storage().data_ptr() not in student_ptrs for p in teacher.parameters())
    assert all(not p.requires_grad for p in teacher.parameters())
    for name, value in student.state_dict().items():
        assert torch.equal(value, teacher.state_dict()[name]), name
    assert any(getattr(m, "drop_prob", 0) > 0 for m in student.modules())
    assert not any(getattr(m, "drop_prob", 0) > 0 for m in teacher.modules())
    assert student.head.last_layer.parametrizations.weight.original0.requires_grad  # norm_last_layer false
    assert not teacher.head.last_layer.parametrizations.weight.original0.requires_grad


def test_param_groups_clipping_freezing_and_ema():
    args = tiny_config("unused", "unused")
    student, teacher = build_models(args, torch.device("cpu"))
    regularized, not_regularized = get_params_groups(student, args.model.readout_options)
    decayed = {id(p) for p in regularized["params"]}
    for name, param in student.named_parameters():
        if not param.requires_grad:
            continue
        assert (id(param) in decayed) == (not name.endswith(".bias") and param.ndim > 1), name
    assert not_regularized["weight_decay"] == 0.0

    for param in student.parameters():
        param.grad = torch.randn_like(param) * 10
    before = {name: p.grad.clone() for name, p in student.named_parameters()}
    clip_gradients(student, 3.0)
    for name, param in student.named_parameters():  # each gradient clipped on its own
        norm = before[name].norm()
        expected = before[name] * (3.0 / (norm + 1e-6)) if 3.0 / (norm + 1e-6) < 1 else before[name]
        assert torch.allclose(param.grad, expected, rtol=1e-5, atol=1e-7), name
    cancel_gradients_last_layer(0, student, freeze_last_layer=1)
    assert all((p.grad is None) == ("last_layer" in n) for n, p in student.named_parameters())

    old = [p.clone() for p in teacher.parameters()]
    with torch.no_grad():
        for param in student.parameters():
            param.add_(1.0)
    update_teacher(student.parameters(), teacher.parameters(), 0.9)
    for previous, new, source in zip(old, teacher.parameters(), student.parameters()):
        assert torch.allclose(new, 0.9 * previous + 0.1 * source, atol=1e-6)


def test_training_writes_checkpoints_logs_and_tensorboard(tmp_path, capsys):
    data = make_images(tmp_path / "flat")  # flat folder, no class sub-folders
    (tmp_path / "flat" / "broken.jpg").write_bytes(b"\xff\xd8 truncated jpeg")
    out = tmp_path / "out"
    result = train_dino(tiny_config(data, out, "--epochs", "2", "--saveckp_freq", "1"))
    assert sorted(p for p in os.listdir(out) if p.endswith(".pth")) == \
        ["checkpoint.pth", "checkpoint0000.pth", "checkpoint0001.pth"]
    checkpoint = torch.load(out / "checkpoint.pth", weights_only=True)
    assert set(checkpoint) == {"student", "teacher", "optimizer", "epoch", "args", "dino_loss", "fp16_scaler",
                               "log_record", "world_size"}
    assert checkpoint["epoch"] == 2 and isinstance(checkpoint["args"], dict)
    assert checkpoint["args"]["readout"] == "sparo" and checkpoint["args"]["sparo_slots"] == 4
    assert json.loads(json.dumps(checkpoint["args"])) == checkpoint["args"]
    assert all(k.startswith(("backbone.", "head.")) for k in checkpoint["teacher"])
    assert torch.equal(checkpoint["dino_loss"]["center"], result.dino_loss.center)
    lines = [json.loads(line) for line in (out / "log.txt").read_text().splitlines()]
    assert [line["epoch"] for line in lines] == [0, 1]
    assert {"train_loss", "train_lr", "train_wd", "train_teacher_entropy", "train_agreement"} <= set(lines[0])
    assert all(math.isfinite(line["train_loss"]) for line in lines)
    assert lines[0]["skipped_images"] >= 1  # the broken file was passed over, counted, and training went on
    assert any(name.startswith("events.out.tfevents") for name in os.listdir(out))
    output = capsys.readouterr()
    assert "eta:" in output.out and "img/s:" in output.out and "data:" in output.out
    assert "skipping unreadable image" in output.err


def test_resume_equals_uninterrupted_run(tmp_path, capsys):
    data = make_images(tmp_path / "data")
    straight = train_dino(tiny_config(data, tmp_path / "straight", "--epochs", "2", "--saveckp_freq", "1"))
    # a run interrupted after epoch 0: its output_dir holds only the epoch-0 checkpoint
    os.makedirs(tmp_path / "resumed")
    shutil.copy(tmp_path / "straight" / "checkpoint0000.pth", tmp_path / "resumed" / "checkpoint.pth")
    capsys.readouterr()
    resumed = train_dino(tiny_config(data, tmp_path / "resumed", "--epochs", "2"))
    assert "resumed from" in capsys.readouterr().out and resumed.start_epoch == 1
    for name, value in straight.teacher.state_dict().items():
        assert torch.equal(value, resumed.teacher.state_dict()[name]), name
    assert torch.equal(straight.dino_loss.center, resumed.dino_loss.center)


def test_init_from_official_format_and_resume_precedence(tmp_path, capsys):
    data = make_images(tmp_path / "data", count=8)
    args = tiny_config(data, tmp_path / "out", "--epochs", "1", "--lr", "1e-12", "--min_lr", "0")
    donor, _ = build_models(args, torch.device("cpu"))
    with torch.no_grad():
        for param in donor.parameters():
            param.normal_()
    official = {"teacher": {f"module.{k}": v for k, v in donor.state_dict().items()}}
    save_atomic(official, tmp_path / "official.pth")
    result = train_dino(dataclasses.replace(args, init_from=str(tmp_path / "official.pth")))
    printed = capsys.readouterr().out
    assert "weights from" in printed and "head from" in printed
    # with a vanishing lr, the trained teacher is still (almost) the donor
    for name, value in donor.state_dict().items():
        assert torch.allclose(result.teacher.state_dict()[name], value, atol=1e-4), name
    # a checkpoint in output_dir wins over --init_from
    args = tiny_config(data, tmp_path / "out", "--epochs", "2", "--init_from", tmp_path / "missing.pth")
    assert train_dino(args).start_epoch == 1


@pytest.mark.parametrize("flags, message", [
    (["--momentum_teacher", "1.5"], "--momentum_teacher"),
    (["--global_crop_size", "40"], "multiple of --patch_size"),
    (["--global_crops_scale", "0.8", "0.2"], "--global_crops_scale"),
    (["--precision", "fp16"], "CUDA"),
    (["--batch_size_per_gpu", "64"], "fewer than one batch"),
    (["--augment_device", "cuda"], "--augment_device cuda was asked for but CUDA is not available"),
])
def test_bad_flag_values_are_user_errors(tmp_path, flags, message):
    if "CUDA" in message and torch.cuda.is_available():
        pytest.skip("a CUDA GPU is present")
    data = make_images(tmp_path / "data", count=4, size=20)
    with pytest.raises(UserError, match=message):
        train_dino(tiny_config(data, tmp_path / "out", *flags))


def test_missing_data_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="data path not found"):
        train_dino(tiny_config(tmp_path / "nowhere", tmp_path / "out"))
    with pytest.raises(UserError, match="--data_path"):
        parse_config(["--output_dir", str(tmp_path / "out")])


def test_collapse_warning(capsys):
    args = tiny_config("d", "o", "--batch_size_per_gpu", "32")
    healthy = {"epoch": 0, "train_loss": 3.0, "train_teacher_mode_share": 0.2}
    assert not warn_if_collapsed(healthy, args)
    assert capsys.readouterr().err == ""
    uniform = {"epoch": 3, "train_loss": math.log(256) * 1.005, "train_teacher_mode_share": 0.01}
    assert warn_if_collapsed(uniform, args)
    err = capsys.readouterr().err
    assert "collapsed at epoch 3" in err and "ln(out_dim)" in err and "--teacher_temp" in err
    one_hot = {"epoch": 1, "train_loss": 0.5, "train_teacher_mode_share": 0.99}
    assert warn_if_collapsed(one_hot, args)
    assert "one-hot" in capsys.readouterr().err


@pytest.mark.parametrize("native", [True, False])
def test_auto_precision_takes_bf16_only_where_gpus_compute_it_natively(monkeypatch, native):
    """V100s and T4s only emulate bf16 (torch.cuda.is_bf16_supported() is true there): auto must give them
    fp16 + GradScaler, as the reference, and bf16 to GPUs that compute it natively."""
    def is_bf16_supported(including_emulation: bool = True) -> bool:
        return native or including_emulation

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", is_bf16_supported)
    cuda = "cuda:0"
    assert resolve_precision("auto", None, cuda) == ("bf16" if native else "fp16")
    assert resolve_precision("auto", False, cuda) == "fp32"  # --use_fp16 false
    assert resolve_precision("bf16", None, cuda) == "bf16"  # asked for explicitly


def test_fp16_resume_of_a_run_saved_without_a_scaler_starts_a_fresh_one(tmp_path, capsys):
    """A checkpoint written by an fp32 or bf16 run (fp16_scaler None) resumed with --precision fp16: the run goes
    on with a fresh GradScaler instead of stopping at "no 'fp16_scaler' entry"."""
    data = make_images(tmp_path / "data", count=8)
    train_dino(tiny_config(data, tmp_path / "out", "--epochs", "1", "--precision", "fp32"))
    args = tiny_config(data, tmp_path / "out", "--epochs", "2")
    student, teacher = build_models(args, torch.device("cpu"))
    optimizer = build_optimizer(args.optimizer, get_params_groups(student, args.model.readout_options),
                                torch.device("cpu"))
    scaler = torch.amp.GradScaler("cpu")
    loss = DINOLoss(args.out_dim, 4, args.warmup_teacher_temp, args.teacher_temp, 0, args.epochs)
    capsys.readouterr()
    state = TrainState(student, teacher, optimizer, loss, scaler, {})
    start = _resume_or_initialise(args, state, str(tmp_path / "out" / "checkpoint.pth"), 8, 2, DistributedContext(),
                                  TrainingLog(str(tmp_path / "out"), enabled=False))
    assert start == (1, 0, 0)
    assert "saved without fp16 training: starting a fresh GradScaler" in capsys.readouterr().out
    assert scaler.state_dict() == torch.amp.GradScaler("cpu").state_dict()


def test_an_epoch_whose_log_line_was_lost_is_logged_from_its_checkpoint(tmp_path, capsys):
    """A kill between writing checkpoint.pth and appending the epoch's log.txt line: the rerun writes the line
    from the checkpoint's copy of the record, so log.txt still holds every epoch exactly once."""
    data = make_images(tmp_path / "data", count=8)
    out = tmp_path / "out"
    train_dino(tiny_config(data, out, "--epochs", "1"))
    (record,) = [json.loads(line) for line in (out / "log.txt").read_text().splitlines()]
    (out / "log.txt").write_text("")
    capsys.readouterr()
    train_dino(tiny_config(data, out, "--epochs", "2"))
    assert "log.txt had no line for epoch 0" in capsys.readouterr().out
    lines = [json.loads(line) for line in (out / "log.txt").read_text().splitlines()]
    assert [line["epoch"] for line in lines] == [0, 1] and lines[0] == record
    train_dino(tiny_config(data, out, "--epochs", "3"))  # a log that has the epoch is left alone
    assert [json.loads(line)["epoch"] for line in (out / "log.txt").read_text().splitlines()] == [0, 1, 2]


def test_the_demo_recipe_on_other_images_neither_generates_nor_scores_the_demo_set(tmp_path):
    """--demo with --data_path trains the demo's recipe on those images: the demo set is neither generated nor
    used for the end-of-training k-NN; without --data_path the demo trains, and is scored, on its own set."""
    elsewhere = parse_config(["--demo", "--data_path", str(tmp_path / "images")])
    assert (elsewhere.demo_data_dir, elsewhere.knn_data_path) == (None, None)
    assert elsewhere.model.arch == "vit_tiny" and elsewhere.epochs == 10  # the recipe still applies
    demo = parse_config(["--demo", "--demo_data_dir", str(tmp_path / "demo")])
    assert demo.demo_data_dir == demo.knn_data_path == str(tmp_path / "demo")
    assert demo.data_path == str(tmp_path / "demo" / "train")
