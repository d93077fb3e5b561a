import json
import sys
import time

import numpy as np
import pytest
import torch
from helpers import ROOT, environment, tiny_config
from PIL import Image

from benchmarks.processes import kill_tree, start_session, wait_until
from benchmarks.reference_step import ReferenceStep, reference_dino_loss
from benchmarks.run import main
from benchmarks.train_step import RESULT_PREFIX, run_in_subprocess, skipped_steps, warm_up
from dino_sparo.errors import UserError
from dino_sparo.loss import DINOLoss
from dino_sparo.optim import get_params_groups
from dino_sparo.train.build import build_models, build_training
from dino_sparo.train.config import parse_config

TINY_MODEL = ["--arch", "vit_tiny", "--depth", "3", "--out_dim", "256", "--global_crop_size", "32",
              "--local_crop_size", "16", "--batch_size", "2", "--local_crops_number", "2"]


def write_photos(folder, count=2):
    folder.mkdir()
    rng = np.random.default_rng(0)
    for index in range(count):
        pixels = rng.integers(0, 256, (40, 56, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"photo{index}.jpg", quality=90)
    return folder


@pytest.mark.slow
def test_entry_point_prints_tables_and_writes_json(tmp_path, capsys):
    out = tmp_path / "results.json"
    photos = write_photos(tmp_path / "photos")
    main([*TINY_MODEL, "--readout", "cls", "sparo", "--steps", "1", "--warmup", "0", "--data_rounds", "1",
          "--images", str(photos), "--data_images", "2", "--data_local_crops", "2", "--knn_train", "300",
          "--knn_test", "40", "--knn_dim", "16", "--knn_classes", "5", "--knn_repeats", "1", "--json", str(out)])
    printed = capsys.readouterr().out
    for header in ("== train ==", "== data ==", "== knn ==", "images_per_s", "speedup"):
        assert header in printed
    results = json.loads(out.read_text())
    assert {"cpu", "threads", "torch"} <= set(results["machine"])
    rows = results["rows"]
    train = [r for r in rows if r["bench"] == "train_step"]
    expected = {(readout, mode) for readout in ("cls", "sparo") for mode in ("baseline", "fast")}
    assert {(r["readout"], r["mode"]) for r in train} == expected
    for row in train:
        assert row["images_per_s"] > 0 and row["peak_mib"] > 0 and row["seconds"] > 0
        assert row["precision"] in ("fp32", "bf16", "fp16")
        assert ("speedup" in row) == (row["mode"] == "fast")
    baseline = next(r for r in train if r["mode"] == "baseline")
    assert baseline["precision"] == "fp32"
    data = [r for r in rows if r["bench"] == "data"]
    assert [r["mode"] for r in data] == ["baseline", "fast"] and data[1]["speedup"] > 0
    knn = [r for r in rows if r["bench"] == "knn"]
    assert [r["mode"] for r in knn] == ["baseline", "fast"]
    assert knn[1]["identical"] is True  # the same features must give the same accuracies
    assert 0 < knn[1]["top1"] < 100  # the synthetic clusters are neither trivial nor hopeless


def test_fast_only_mode_and_bad_inputs(tmp_path):
    out = tmp_path / "knn.json"
    main(["--bench", "knn", "--baseline", "false", "--knn_train", "100", "--knn_test", "10", "--knn_dim", "8",
          "--knn_classes", "3", "--knn_repeats", "1", "--json", str(out)])
    rows = json.loads(out.read_text())["rows"]
    assert [r["mode"] for r in rows] == ["fast"] and "speedup" not in rows[0]
    with pytest.raises(UserError, match="nothing to run"):
        main(["--baseline", "false", "--fast", "false"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no .jpg"):
        main(["--bench", "data", "--images", str(tmp_path / "empty"), "--json", str(out)])
    (tmp_path / "a_file").write_text("")
    with pytest.raises(UserError, match="--json .* cannot be written"):
        main(["--bench", "knn", "--json", str(tmp_path / "a_file" / "results.json")])


def test_json_keeps_the_finished_rows_when_the_run_is_killed_midway(tmp_path):
    """The k-NN rows are written as soon as they are measured: killing the run during the (long) loader
    benchmark after them leaves a complete file holding them."""
    out = tmp_path / "results.json"
    command = [sys.executable, "-m", "benchmarks.run", "--bench", "knn", "loader", "--knn_train", "100",
               "--knn_test", "10", "--knn_dim", "8", "--knn_classes", "3", "--knn_repeats", "1",
               "--loader_transform", "pil", "--loader_workers", "0", "--loader_images", "100000", "--json", str(out)]
    process = start_session(command, cwd=ROOT, env=environment())
    try:
        def knn_rows_written() -> bool:
            return out.exists() and len(json.loads(out.read_text())["rows"]) == 2
        wait_until(knn_rows_written, timeout=120, process=process, interval=0.05)
        time.sleep(1)  # into the loader benchmark
    finally:
        kill_tree(process)
    results = json.loads(out.read_text())
    assert results["machine"]["cpu"] and [row["mode"] for row in results["rows"]] == ["baseline", "fast"]
    assert all(row["bench"] == "knn" for row in results["rows"])


@pytest.mark.parametrize("readout", ["cls", "sparo"])
def test_baseline_step_does_the_same_update_as_the_fast_step(readout):
    """The reference-style step (explicit attention, per-token SPARO, loss loop, loop EMA) and the project's
    step must train identically from identical weights, or the speed ratio would compare different work."""
    args = parse_config(["--data_path", "unused", "--arch", "vit_tiny", "--depth", "3", "--readout", readout,
                         "--sparo_slots", "4", "--sparo_slot_dim", "8", "--out_dim", "64", "--head_hidden_dim", "32",
                       "--head_bottleneck_dim", "16", "--drop_path_rate", "0", "--global_crop_size", "32",
                       "--local_crop_size", "16", "--local_crops_number", "2", "--precision", "fp32"])
    torch.manual_seed(0)
    crops = [torch.randn(2, 3, 32, 32) for _ in range(2)] + [torch.randn(2, 3, 16, 16) for _ in range(2)]
    results = []
    for kind in ("fast", "baseline"):
        torch.manual_seed(1)
        step = build_training(args)
        teacher, loss = step.teacher, step.dino_loss
        initial = torch.cat([p.detach().flatten().clone() for p in teacher.parameters()])
        if kind == "baseline":
            step = ReferenceStep(step.student_module, teacher, loss, get_params_groups(step.student_module),
                                 args.clip_grad, args.freeze_last_layer)
        for group in step.optimizer.param_groups:
            group["lr"] = 1e-3
        for _ in range(2):
            value = step([crops] if kind == "fast" else crops, 1, 0.9)
        update = torch.cat([p.detach().flatten() for p in teacher.parameters()]) - initial
        results.append((float(value["loss"]) if isinstance(value, dict) else value, update, loss.center.clone()))
    (fast_loss, fast_update, fast_center), (base_loss, base_update, base_center) = results
    assert fast_loss == pytest.approx(base_loss, rel=1e-5)
    torch.testing.assert_close(fast_center, base_center, rtol=1e-5, atol=1e-6)
    # Adam turns rounding-level gradient differences of near-zero gradients into whole lr-sized steps, so
    # compare the teacher's total update as a vector rather than element by element.
    assert fast_update.norm() > 0
    assert (fast_update - base_update).norm() / fast_update.norm() < 1e-2


def test_reference_loss_loop_equals_project_loss():
    torch.manual_seed(0)
    student, teacher = torch.randn(5 * 3, 32), torch.randn(2 * 3, 32)
    project, reference = DINOLoss(32, 5, 0.04, 0.04, 0, 10), DINOLoss(32, 5, 0.04, 0.04, 0, 10)
    expected = project(student, teacher, 0)
    torch.testing.assert_close(reference_dino_loss(reference, student, teacher, 0), expected)
    torch.testing.assert_close(reference.center, project.center)


def test_fp16_warm_up_lasts_until_the_scale_settles_and_later_skips_are_counted():
    """The baseline's GradScaler starts at 65536, which this tiny model's fp16 gradients overflow: warm-up steps
    go on until one leaves the scale unchanged (an update taken), so no timed step is a skipped one; a skip
    while timing halves the scale and is counted. The baseline's AdamW is the single-tensor one."""
    args = tiny_config("unused", "unused", "--precision", "fp32", "--drop_path_rate", "0", "--patch_size", "8")
    student, teacher = build_models(args, torch.device("cpu"))
    step = ReferenceStep(student, teacher, DINOLoss(args.out_dim, 4, 0.04, 0.04, 0, 10),
                         get_params_groups(student, args.model.readout_options), 3.0, 0, "fp16")
    assert step.optimizer.defaults["foreach"] is False
    crops = [torch.randn(4, 3, 32, 32) for _ in range(2)] + [torch.randn(4, 3, 16, 16) for _ in range(2)]
    initial = step.scaler.get_scale()
    ran = warm_up(lambda: step(crops, 1, 0.99), step.scaler, 1, "baseline")
    settled = step.scaler.get_scale()
    assert settled < initial and ran == skipped_steps(initial, settled) + 1  # every skip, then one update
    before = [p.detach().clone() for p in student.parameters()]
    step(crops, 1, 0.99)
    assert step.scaler.get_scale() == settled
    assert any(not torch.equal(p, b) for p, b in zip(student.parameters(), before))
    step.scaler.update(new_scale=2.0 ** 30)  # far past what the gradients bear: the next two steps are skipped
    step(crops, 1, 0.99), step(crops, 1, 0.99)
    assert skipped_steps(2.0 ** 30, step.scaler.get_scale()) == 2 and skipped_steps(4.0, 8.0) == 0


HANDSHAKE = """
import os, sys, time
print(os.environ.get("TORCH_LOGS"), flush=True)
while not os.path.exists(sys.argv[1]):  # written by the parent once it has seen the line above
    time.sleep(0.01)
print("timed step 1", flush=True)
if sys.argv[2] == "hang":
    time.sleep(300)
print(sys.argv[2], flush=True)
"""


def test_a_benchmark_subprocess_streams_its_lines_and_a_killed_one_keeps_them(tmp_path):
    """Each line reaches the log while the subprocess runs (it waits for the parent to have seen its first
    line), the result line does not; a compiling one logs its recompilations; a subprocess killed at its time
    limit leaves its lines in the log and an error naming the limit."""
    logged = []
    handshake = tmp_path / "seen"

    def log(line: str) -> None:
        logged.append(line)
        handshake.touch()

    result = run_in_subprocess([sys.executable, "-c", HANDSHAKE, handshake, RESULT_PREFIX + '{"rows": 1}'], log,
                               compiles=True, timeout=60)
    assert result == {"rows": 1} and logged == ["recompiles", "timed step 1"]
    logged.clear()
    handshake.unlink()
    with pytest.raises(RuntimeError, match="killed after 3 s"):
        run_in_subprocess([sys.executable, "-c", HANDSHAKE, handshake, "hang"], log, timeout=3)
    assert logged[1:] == ["timed step 1"]
