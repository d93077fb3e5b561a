import json
import os
import sys

import pytest
import torch
from helpers import ROOT, TINY, TORCHRUN, environment, make_images, run, script, tiny_config

from dino_sparo.data import DataAugmentationDINO
from dino_sparo.data.datasets import ImageDataset, ResumableDistributedSampler
from dino_sparo.distributed import DistributedContext, init_distributed, is_dist_initialized
from dino_sparo.train.build import build_models
from dino_sparo.train.config import parse_args


def test_local_rank_spellings_and_single_process(monkeypatch):
    assert parse_args(["--local-rank", "3"]).local_rank == 3
    assert parse_args(["--local_rank", "2"]).local_rank == 2
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_PROCID", "SLURM_NTASKS"):
        monkeypatch.delenv(name, raising=False)
    context = init_distributed("cpu")
    assert (context.rank, context.world_size) == (0, 1) and not is_dist_initialized()


@pytest.mark.slow
def test_two_processes_gloo_keep_identical_teachers(tmp_path):
    data = make_images(tmp_path / "data", count=16)
    out = tmp_path / "out"
    out.mkdir()
    # a retrofit whose second stage (--unfreeze_at 1) unfreezes the blocks: DistributedDataParallel must be built
    # anew to average their gradients, or the ranks' students, hence teachers, part
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               os.path.join(ROOT, "tests", "distributed_worker.py"), *TINY, "--data_path", data,
               "--output_dir", str(out), "--epochs", "2", "--freeze_blocks", "all", "--unfreeze_at", "1",
               "--unfreeze_warmup", "1", str(out)]
    completed = run(command, timeout=240)  # own process group, killed as a whole: no orphaned workers
    assert completed.returncode == 0, completed.stderr[-3000:]
    ranks = [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(2)]
    assert ranks[0]["world_size"] == ranks[1]["world_size"] == 2
    for name, value in ranks[0]["teacher"].items():
        assert torch.equal(value, ranks[1]["teacher"][name]), name
    assert torch.equal(ranks[0]["center"], ranks[1]["center"])
    # rank r fed rows arange(8) + r: the center moves by 0.1 x the mean over both ranks
    expected = 0.1 * (torch.arange(8.0) + 0.5)
    for rank in ranks:
        assert torch.allclose(rank["probe_center"], expected.view(1, -1), atol=1e-6)
    assert "2 process(es)" in completed.stdout and completed.stdout.count("student:") == 1  # rank 0 prints
    assert completed.stdout.count("the backbone is unfrozen") == 1
    assert (out / "checkpoint.pth").is_file()


@pytest.mark.slow
def test_two_processes_gloo_train_save_and_resume_with_compiled_blocks(tmp_path):
    """``--compile`` under torchrun: each rank's compiled blocks inside DistributedDataParallel (Dynamo's DDP
    optimiser off) train an epoch and save; the same command with one more epoch resumes from the checkpoint.
    Dynamo and AOT autograd do what a GPU run does; only inductor's code generation, whose results
    tests/test_compile.py compares with the eager step, is left out (the aot_eager backend)."""
    data = make_images(tmp_path / "data", count=16)
    out = tmp_path / "out"
    flags = [*TINY, "--patch_size", "8", "--precision", "fp32", "--compile", "--data_path", data, "--output_dir", out]
    env = environment(compile_backend="aot_eager")
    for epochs in (1, 2):
        completed = run([*TORCHRUN, "--nproc_per_node", "2", *script("main_dino.py")[1:], *flags, "--epochs", epochs],
                        timeout=400, env=env)
        assert completed.returncode == 0, completed.stderr[-3000:]
    with open(out / "log.txt") as handle:
        records = [json.loads(line) for line in handle]
    assert [record["epoch"] for record in records] == [0, 1]
    assert [record["world_size"] for record in records] == [2, 2]
    assert records[1]["resumed_from_epoch"] == 1
    saved = torch.load(out / "checkpoint.pth", weights_only=True)
    eager, _ = build_models(tiny_config(data, out, "--patch_size", "8"), torch.device("cpu"))
    assert saved["epoch"] == 2 and saved["student"].keys() == eager.state_dict().keys()


def _steps(rank: int, world_size: int, crops: list[list[torch.Tensor]], out: str, accum_steps: int = 1) -> None:
    """Two optimizer steps of a tiny model, each on this rank's share of a crop batch, in ``accum_steps``
    micro-batches (inside this rank's process group when there are several); saves the result."""
    from dino_sparo.train.build import build_training
    from dino_sparo.train.schedules import build_schedules

    share = crops[0][0].shape[0] // world_size
    micro = share // accum_steps
    # SGD and no drop path: the comparison is then exact up to float summation order (AdamW's first step is
    # sign(gradient), which rounding can flip for gradients near zero).
    args = tiny_config("unused", "unused", "--optimizer", "sgd", "--drop_path_rate", "0", "--warmup_epochs", "0",
                       "--freeze_last_layer", "0", "--batch_size_per_gpu", micro, "--accum_steps", accum_steps,
                       "--precision", "fp32", "--epochs", "1", "--lr", "0.5")
    torch.manual_seed(0)
    context = DistributedContext(rank, world_size, rank, torch.device("cpu"))
    step = build_training(args, context)
    module, teacher, dino_loss = step.student_module, step.teacher, step.dino_loss
    schedules = build_schedules(args, len(crops), world_size)
    for iteration, batch_crops in enumerate(crops):
        schedules.apply(step.optimizer, iteration)
        mine = [crop[rank * share:(rank + 1) * share] for crop in batch_crops]
        micro_batches = [[crop[index * micro:(index + 1) * micro] for crop in mine] for index in range(accum_steps)]
        step(micro_batches, 0, float(schedules.momentum[iteration]))
    if rank == 0:
        torch.save({"student": module.state_dict(), "teacher": teacher.state_dict(), "center": dino_loss.center,
                    "lr": schedules.lr[0]}, out)


def _crop_batches(batch: int) -> list[list[torch.Tensor]]:
    generator = torch.Generator().manual_seed(1)
    return [[torch.randn(batch, 3, size, size, generator=generator) for size in (32, 32, 16, 16)] for _ in range(2)]


def _assert_same_training(one: dict, other: dict, atol: float, rtol: float) -> None:
    assert one["lr"] == other["lr"] > 0  # --lr x the images of an optimizer step / 256, however they are split
    initial, _ = build_models(tiny_config("u", "u", "--drop_path_rate", "0"), torch.device("cpu"))
    moved = [name for name, value in initial.state_dict().items() if not torch.equal(one["student"][name], value)]
    assert len(moved) > 10  # the steps changed the weights, so equality below is not trivial
    for part in ("student", "teacher"):
        for name, value in one[part].items():
            torch.testing.assert_close(other[part][name], value, atol=atol, rtol=rtol, msg=f"{part} {name}")
    torch.testing.assert_close(other["center"], one["center"], atol=1e-7, rtol=1e-5)


def test_two_accumulated_micro_batches_step_like_one_batch_of_all_their_images(tmp_path):
    """--accum_steps 2 with batch 4 equals batch 8 after each optimizer step: the loss averaged over the 8 images,
    the center moved once from all of them, the EMA once (fp32, no drop path)."""
    crops = _crop_batches(8)
    _steps(0, 1, crops, str(tmp_path / "whole.pt"))
    _steps(0, 1, crops, str(tmp_path / "accumulated.pt"), accum_steps=2)
    whole, accumulated = (torch.load(tmp_path / name, weights_only=False) for name in ("whole.pt", "accumulated.pt"))
    _assert_same_training(whole, accumulated, atol=1e-7, rtol=1e-5)


@pytest.mark.slow
def test_two_processes_accumulating_step_like_one_process_of_the_whole_batch(tmp_path, gloo_pair):
    """DDP's gradient averaging (skipped by no_sync on the first micro-batch), the all-rank centre and the lr
    scaled by the effective batch make 2 processes x 2 micro-batches of 2 train exactly like 1 process x batch 8."""
    crops = _crop_batches(8)
    _steps(0, 1, crops, str(tmp_path / "one.pt"))
    gloo_pair.run(_steps, crops, str(tmp_path / "two.pt"), 2)
    one, two = (torch.load(tmp_path / name, weights_only=False) for name in ("one.pt", "two.pt"))
    _assert_same_training(one, two, atol=2e-6, rtol=1e-4)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_resumed_sampler_visits_exactly_what_the_uninterrupted_epoch_had_left(num_workers):
    """After a stop at iteration k of an epoch, each rank's loader yields exactly the indices an uninterrupted
    epoch would still have visited, in the same order, also through worker processes."""
    dataset = torch.utils.data.TensorDataset(torch.arange(103))
    batch, stopped_at = 4, 5
    for rank in range(2):
        sampler = ResumableDistributedSampler(dataset, num_replicas=2, rank=rank, shuffle=True, seed=7)
        sampler.set_epoch(3)
        uninterrupted = list(sampler)
        sampler.samples_done = stopped_at * batch * 2  # both ranks' batches
        loader = torch.utils.data.DataLoader(dataset, batch_size=batch, sampler=sampler, num_workers=num_workers,
                                             drop_last=True)
        resumed = [int(index) for (indices,) in loader for index in indices]
        expected = uninterrupted[stopped_at * batch:]
        assert resumed == expected[: len(expected) // batch * batch]
        assert len(loader) == len(expected) // batch


def crops_by_index(sampler: ResumableDistributedSampler, num_workers: int) -> dict[int, list[torch.Tensor]]:
    loader = torch.utils.data.DataLoader(sampler.dataset, batch_size=2, sampler=sampler, num_workers=num_workers)
    found = {}
    for crops, _, _ in loader:
        indices = [index for index, _ in list(sampler)[len(found):len(found) + len(crops[0])]]
        for position, index in enumerate(indices):
            found[index] = [crop[position] for crop in crops]
    return found


def test_a_resumed_epoch_sees_the_crops_of_the_uninterrupted_one_on_any_processes_and_workers(tmp_path):
    """Each sample's augmentations are drawn from (seed, epoch, index): the crops of a sample do not depend on
    where in the epoch a run resumed, on how many processes share it, or on DataLoader workers."""
    dataset = ImageDataset(make_images(tmp_path / "data", count=12, size=40),
                           DataAugmentationDINO((0.4, 1.0), (0.05, 0.4), 2, 32, 16), count_skipped=True)

    def sampler(world_size: int, rank: int, samples_done: int) -> ResumableDistributedSampler:
        made = ResumableDistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=True, seed=3,
                                           seed_samples=True)
        made.set_epoch(2)
        made.samples_done = samples_done
        return made

    uninterrupted = crops_by_index(sampler(1, 0, 0), num_workers=0)
    assert len(uninterrupted) == 12
    torch.manual_seed(99)  # whatever state the generator is in
    resumed = {}
    for rank in range(2):
        resumed.update(crops_by_index(sampler(2, rank, 4), num_workers=2))
    assert len(resumed) == 8 and set(resumed) <= set(uninterrupted)
    for index, crops in resumed.items():
        for crop, expected in zip(crops, uninterrupted[index], strict=True):
            assert torch.equal(crop, expected), index
    # another epoch draws other crops of the same image
    other_epoch = sampler(1, 0, 0)
    other_epoch.set_epoch(3)
    index = next(iter(uninterrupted))
    assert not torch.equal(crops_by_index(other_epoch, num_workers=0)[index][0], uninterrupted[index][0])
