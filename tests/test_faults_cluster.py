"""Faults a multi-day job meets on a shared cluster (gloo on CPU): a peer that hangs, resuming on another number
of processes, torchrun restarting a killed worker, and two nodes' agents (one of them killed). Every process has
a deadline (``run``'s timeout, or ``wait`` below), so a regression fails instead of hanging."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time

import pytest
import torch
from helpers import (
    ROOT,
    TINY,
    TORCHRUN,
    environment,
    free_port,
    kill_tree,
    make_images,
    read,
    run,
    wait_until,
)

from dino_sparo.data.datasets import ResumableDistributedSampler
from dino_sparo.errors import EXIT_PEER_LOST

MAIN = os.path.join(ROOT, "main_dino.py")


def logged_epochs(out) -> list[dict]:
    return [json.loads(line) for line in read(str(out / "log.txt")).splitlines()]


def is_stopped(pid: int) -> bool:
    """Whether ``pid`` is stopped (SIGSTOP), from /proc."""
    with open(f"/proc/{pid}/stat") as handle:
        return handle.read().rsplit(")", 1)[1].split()[0] in ("T", "t")


def start_rank(rank: int, world_size: int, port: str, argv: list, log_path, **env: str) -> subprocess.Popen:
    """One process of a job joined through MASTER_ADDR/PORT only, as under srun: no agent watches it."""
    environ = environment(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size),
                          MASTER_ADDR="127.0.0.1", MASTER_PORT=port, **env)
    with open(log_path, "w") as log:
        return subprocess.Popen([sys.executable, MAIN, *map(str, argv)], cwd=ROOT, env=environ, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)


@pytest.mark.slow
def test_a_hung_peer_ends_the_others_within_dist_timeout_with_one_line(tmp_path):
    data = make_images(tmp_path / "data", count=16)
    argv = [*TINY, "--data_path", data, "--output_dir", tmp_path / "out", "--epochs", "2", "--dist_timeout", "5"]
    port = str(free_port())
    fault = dict(DINO_SPARO_FAULT="signal:SIGSTOP:step=3", DINO_SPARO_FAULT_RANK="1",
                 PYTHONPATH=os.pathsep.join([os.path.join(ROOT, "tests", "faults"), ROOT]))
    ranks = [start_rank(rank, 2, port, argv, tmp_path / f"rank{rank}.log", **fault) for rank in range(2)]
    try:
        wait_until(lambda: is_stopped(ranks[1].pid), timeout=180, process=ranks[1])
        stopped_at = time.monotonic()
        status = ranks[0].wait(timeout=180)
        waited = time.monotonic() - stopped_at
    finally:
        for process in ranks:
            kill_tree(process)
    text = read(str(tmp_path / "rank0.log"))
    assert status == EXIT_PEER_LOST, text[-3000:]
    assert waited < 5 + 60, waited  # the timeout plus a generous margin for a loaded machine (default: 30 min)
    assert "Traceback" not in text and "gloo" not in text
    errors = [line for line in text.splitlines() if line.startswith("error: ")]
    assert errors == ["error: no answer from another process of the job within --dist_timeout 5 s: it hung or was "
                      "stopped (SIGSTOP, a debugger, heavy swapping, a stalled file system or node); see its log, "
                      "then run the same command again to resume from the last checkpoint"]


def epoch_orders(dataset, world_size: int, samples_done: int) -> list[list[int]]:
    """What each rank's sampler yields in epoch 3, after ``samples_done`` samples of it."""
    orders = []
    for rank in range(world_size):
        sampler = ResumableDistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=True, seed=7)
        sampler.set_epoch(3)
        sampler.samples_done = samples_done
        orders.append(list(sampler))
    return orders


@pytest.mark.parametrize("new_world_size", [1, 2, 3])
def test_an_epoch_resumed_on_another_number_of_processes_visits_each_image_once(new_world_size):
    """2 processes stop after 5 batches of 4; the epoch resumes on 1, 2 or 3: no image of it is visited twice,
    and the only ones never visited are the tail of its order that drop_last leaves out of any epoch."""
    dataset = torch.utils.data.TensorDataset(torch.arange(101))
    batch, batches_done = 4, 5
    before = [order[: batches_done * batch] for order in epoch_orders(dataset, 2, 0)]
    after = [order[: len(order) // batch * batch] for order in epoch_orders(dataset, new_world_size,
                                                                            batches_done * batch * 2)]
    visited = [index for order in before + after for index in order]
    assert len(visited) == len(set(visited))
    full_order = ResumableDistributedSampler(dataset, num_replicas=1, rank=0, shuffle=True, seed=7)
    full_order.set_epoch(3)
    never = full_order.epoch_order()[len(visited):]
    assert set(visited) | set(never) == set(range(101)) and len(never) < new_world_size * batch


@pytest.mark.slow
def test_a_run_stopped_on_2_processes_resumes_on_1_2_and_3(tmp_path):
    data = make_images(tmp_path / "data", count=48)
    out = tmp_path / "out"
    copy, same = tmp_path / "copy", tmp_path / "same"
    flags = [*TINY, "--data_path", data, "--epochs", "1", "--saveckp_freq", "0", "--output_dir"]
    # 48 images, 4 per process: 6 iterations of 8 images on 2 processes. SIGUSR1 reaches only rank 1, in its 3rd
    # step; rank 0 learns it at the next logging interval, the end of iteration 3, where both stop.
    stopped = run([*TORCHRUN, "--nproc_per_node", "2", MAIN, *flags, out], timeout=180,
                  env=environment(fault="signal:SIGUSR1:step=3", fault_rank=1))
    assert stopped.returncode != 0
    assert "preempted by SIGUSR1 at epoch 0, iteration 4" in stopped.stderr, stopped.stderr[-3000:]
    assert "preempted (another process of the job got the signal) at epoch 0, iteration 4" in stopped.stderr
    checkpoint = torch.load(out / "checkpoint.pth", weights_only=True)
    assert (checkpoint["iteration"], checkpoint["samples_done"], checkpoint["world_size"]) == (4, 32, 2)
    shutil.copytree(out, copy)
    shutil.copytree(out, same)

    # 2 processes again, as torchrun relaunches the job: iterations 4 and 5
    again = run([*TORCHRUN, "--nproc_per_node", "2", MAIN, *flags, same], timeout=180)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "at epoch 0, iteration 4 of 6 (a preempted epoch)" in again.stdout
    assert "resuming a run of" not in again.stdout

    # 1 process: 12 iterations of 4 images; the 16 images left are its iterations 8 to 11
    single = run([sys.executable, MAIN, *flags, out], timeout=180)
    assert single.returncode == 0, single.stderr[-3000:]
    assert ("resuming a run of 2 process(es) on 1: the global batch is now 4 images (was 8), so the peak learning "
            "rate (--lr 0.0005 x global batch / 256) is now 7.813e-06 (was 1.563e-05), and an epoch has 12 "
            "iterations (had 6)") in single.stdout
    assert "at epoch 0, iteration 8 of 12 (a preempted epoch), after 32 of its 48 images" in single.stdout
    assert "Epoch: [0/1] [10/12]" in single.stdout and "Epoch: [0/1] [ 8/12]" not in single.stdout

    # 3 processes: 4 iterations of 12 images; the 16 left make one (iteration 3), the last 4 are dropped
    triple = run([*TORCHRUN, "--nproc_per_node", "3", MAIN, *flags, copy], timeout=240)
    assert triple.returncode == 0, triple.stderr[-3000:]
    assert "resuming a run of 2 process(es) on 3: the global batch is now 12 images (was 8)" in triple.stdout
    assert "at epoch 0, iteration 3 of 4 (a preempted epoch), after 32 of its 48 images" in triple.stdout
    assert "Epoch: [0/1] [4/4]" in triple.stdout and "Epoch: [0/1] [2/4]" not in triple.stdout

    for folder, world_size in ((out, 1), (same, 2), (copy, 3)):
        (record,) = logged_epochs(folder)
        assert (record["epoch"], record["world_size"], record["resumed_from_epoch"]) == (0, world_size, 0)
        final = torch.load(folder / "checkpoint.pth", weights_only=True)
        assert final["epoch"] == 1 and "iteration" not in final and final["world_size"] == world_size


@pytest.mark.slow
def test_torchrun_restarts_a_killed_worker_which_resumes_from_the_last_checkpoint(tmp_path):
    data = make_images(tmp_path / "data", count=16)
    out = tmp_path / "out"
    # 2 iterations per epoch; rank 1 is killed at the start of its 4th step (epoch 1, iteration 1), once
    completed = run([*TORCHRUN, "--nproc_per_node", "2", "--max-restarts", "1", MAIN, *TINY, "--data_path", data,
                     "--output_dir", out, "--epochs", "3", "--saveckp_freq", "0"], timeout=300,
                    env=environment(fault="kill:step=4", fault_rank=1, fault_once=str(tmp_path / "fired")))
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert (tmp_path / "fired").exists()
    assert f"resumed from {out / 'checkpoint.pth'} at epoch 1 (epochs done: 1 of 3)" in completed.stdout
    assert [record["epoch"] for record in logged_epochs(out)] == [0, 1, 2]
    assert torch.load(out / "checkpoint.pth", weights_only=True)["epoch"] == 3


def start_nodes(tmp_path, argv: list, name: str, fault: str | None = None) -> list[subprocess.Popen]:
    """Two torchrun agents of one job (--nnodes 2, one worker each) meeting through a c10d rendezvous on
    localhost, as on two machines; ``fault`` is armed on the worker of rank 1."""
    port = free_port()
    nodes = []
    for node in range(2):
        env = environment(fault=fault, fault_rank=1) if fault else environment()
        with open(tmp_path / f"{name}_node{node}.log", "w") as log:
            nodes.append(subprocess.Popen(
                [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1",
                 "--rdzv_backend", "c10d", "--rdzv_endpoint", f"127.0.0.1:{port}", "--rdzv_id", name, MAIN,
                 *map(str, argv)], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True))
    return nodes


def wait_for_nodes(nodes: list[subprocess.Popen], timeout: float) -> list[int]:
    try:
        return [node.wait(timeout=timeout) for node in nodes]
    finally:
        for node in nodes:
            kill_tree(node)


@pytest.mark.slow
def test_two_nodes_train_and_resume_and_a_killed_node_ends_the_job(tmp_path):
    data = make_images(tmp_path / "data", count=16)
    out = tmp_path / "out"
    argv = [*TINY, "--data_path", data, "--output_dir", out, "--saveckp_freq", "0", "--epochs"]
    assert wait_for_nodes(start_nodes(tmp_path, [*argv, 1], "first"), timeout=240) == [0, 0]

    # the rerun resumes at epoch 1 and completes it (2 iterations); then the node of rank 1 dies (its agent and
    # worker SIGKILLed) at the worker's 4th step, epoch 2, iteration 1
    started = time.monotonic()
    codes = wait_for_nodes(start_nodes(tmp_path, [*argv, 4], "resumed", fault="agent:step=4"), timeout=240)
    assert time.monotonic() - started < 240
    logs = {node: read(str(tmp_path / f"resumed_node{node}.log")) for node in range(2)}
    assert -9 in codes, logs  # the rendezvous decides which agent's worker gets rank 1
    alive = 1 - codes.index(-9)
    assert codes[alive] != 0, logs
    assert f"resumed from {out / 'checkpoint.pth'} at epoch 1" in logs[0] + logs[1]
    survivor = [line for line in logs[alive].splitlines() if line.startswith("error: ")]
    assert survivor == ["error: another process of the job died or lost its connection (killed, out of memory, "
                        "its node or launcher gone); see its log, then run the same command again to resume from "
                        "the last checkpoint"], logs[alive][-3000:]
    assert [(r["epoch"], r["world_size"]) for r in logged_epochs(out)] == [(0, 2), (1, 2)]
    assert torch.load(out / "checkpoint.pth", weights_only=True)["epoch"] == 2  # the last complete one
    assert list(out.glob(".checkpoint*.tmp-*")) == []
