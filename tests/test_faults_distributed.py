"""Faults in multi-process training (gloo on CPU): one rank failing must end the whole job instead of leaving
the others blocked in a collective, and a preemption signal reaching one rank must stop all of them at the
same iteration with one complete checkpoint. Every run has a hard wall-clock limit (``run``'s timeout fails
the test and kills the process group), so a regression fails instead of hanging."""
from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest
import torch

from faultkit import ROOT, TORCHRUN, children, environment, free_port, kill_group, read, run, started, wait_until
from test_train import TINY, make_images

WORKER = os.path.join(ROOT, "tests", "fault_worker.py")


@pytest.mark.slow
@pytest.mark.parametrize("fault_at", ["setup", "step"])
def test_one_rank_failing_under_torchrun_ends_the_job(tmp_path, fault_at):
    data = make_images(tmp_path / "data", count=16)
    completed = run([*TORCHRUN, "--nproc_per_node", "2", WORKER, *TINY, "--data_path", data,
                     "--output_dir", tmp_path / "out", "--epochs", "2"],
                    timeout=180, env=environment(FAULT_RANK="1", FAULT_AT=fault_at))
    assert completed.returncode != 0
    assert "injected fault" in completed.stderr


@pytest.mark.slow
def test_one_rank_failing_without_a_launcher_ends_the_other(tmp_path):
    """As under srun or submitit: two processes joined through MASTER_ADDR/PORT only, no agent to stop the
    survivor; it must get an error from its collective and exit by itself."""
    data = make_images(tmp_path / "data", count=16)
    port = str(free_port())
    processes, logs = [], []
    try:
        for rank in range(2):
            logs.append(open(tmp_path / f"rank{rank}.err", "w"))
            env = environment(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                              MASTER_PORT=port, FAULT_RANK="1", FAULT_AT="step")
            processes.append(subprocess.Popen(
                [sys.executable, WORKER, *TINY, "--data_path", data, "--output_dir", str(tmp_path / "out"),
                 "--epochs", "2"], cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                stderr=logs[-1], start_new_session=True))
        codes = [process.wait(timeout=180) for process in processes]
    finally:
        for process in processes:
            kill_group(process)
        for handle in logs:
            handle.close()
    assert codes[1] != 0 and "injected fault" in read(str(tmp_path / "rank1.err"))
    assert codes[0] != 0  # the survivor ended on its own, with an error


@pytest.mark.slow
def test_sigusr1_to_one_rank_stops_both_at_the_same_iteration_and_torchrun_resumes(tmp_path):
    data = make_images(tmp_path / "data", count=64)
    out, log = tmp_path / "out", str(tmp_path / "run.log")
    command = [*TORCHRUN, "--nproc_per_node", "2", os.path.join(ROOT, "main_dino.py"), *TINY, "--data_path", data,
               "--output_dir", out, "--epochs", "2", "--log_freq", "2", "--saveckp_freq", "0"]
    with started(command, log_path=log) as agent:
        wait_until(lambda: "Epoch: [0/2] [2/8]" in read(log), 180, agent)
        workers = children(agent.pid)
        assert len(workers) == 2
        os.kill(workers[1], signal.SIGUSR1)  # one rank only: the other learns it at the next logging interval
        agent.wait(timeout=120)
    text = read(log)
    assert agent.returncode != 0
    assert "preempted by SIGUSR1 at epoch 0" in text
    assert "preempted (another process of the job got the signal) at epoch 0" in text
    checkpoint = torch.load(out / "checkpoint.pth", weights_only=True)
    assert checkpoint["epoch"] == 0 and checkpoint["iteration"] in (2, 4, 6)  # a logging interval, where the ranks agree
    assert f"iteration {checkpoint['iteration']}:" in text

    completed = run(command, timeout=300)
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert f"at epoch 0, iteration {checkpoint['iteration']} of 8" in completed.stdout
    assert torch.load(out / "checkpoint.pth", weights_only=True)["epoch"] == 2
