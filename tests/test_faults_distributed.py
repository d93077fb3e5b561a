"""Faults in multi-process training (gloo on CPU): one rank failing must end the whole job instead of leaving
the others blocked in a collective, and a preemption signal reaching one rank must stop all of them at the
same iteration with one complete checkpoint. Every run has a hard wall-clock limit (``run``'s timeout fails
the test and kills the process group), so a regression fails instead of hanging."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
from helpers import ROOT, TINY, TORCHRUN, environment, free_port, kill_tree, make_images, read, run

MAIN = os.path.join(ROOT, "main_dino.py")


@pytest.mark.slow
@pytest.mark.parametrize("fault", ["raise:setup", "raise:step=2"])
def test_one_rank_failing_under_torchrun_ends_the_job(tmp_path, fault):
    """Rank 1 fails while building the models (before DistributedDataParallel's first collective) or in its
    second step (while rank 0 is inside collectives)."""
    data = make_images(tmp_path / "data", count=16)
    completed = run([*TORCHRUN, "--nproc_per_node", "2", MAIN, *TINY, "--data_path", data,
                     "--output_dir", tmp_path / "out", "--epochs", "2"],
                    timeout=180, env=environment(fault=fault, fault_rank=1))
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
            env = environment(fault="raise:step=2", fault_rank=1, RANK=str(rank), LOCAL_RANK=str(rank),
                              WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
            processes.append(subprocess.Popen(
                [sys.executable, MAIN, *TINY, "--data_path", data, "--output_dir", str(tmp_path / "out"),
                 "--epochs", "2"], cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                stderr=logs[-1], start_new_session=True))
        codes = [process.wait(timeout=180) for process in processes]
    finally:
        for process in processes:
            kill_tree(process)
        for handle in logs:
            handle.close()
    assert codes[1] != 0 and "injected fault" in read(str(tmp_path / "rank1.err"))
    # the survivor ended on its own: exit 4 and the one line that names the cause, no traceback
    survivor = read(str(tmp_path / "rank0.err"))
    assert codes[0] == 4, survivor[-2000:]
    assert "error: another process of the job died or lost its connection" in survivor
    assert "Traceback" not in survivor
