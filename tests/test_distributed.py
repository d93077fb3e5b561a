import os
import sys

import pytest
import torch

from dino_sparo.distributed import init_distributed, is_dist_initialized
from dino_sparo.train import parse_args
from faultkit import run
from test_train import TINY, make_images

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


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
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               os.path.join(ROOT, "tests", "distributed_worker.py"), *TINY, "--data_path", data,
               "--output_dir", str(out), "--epochs", "1", str(out)]
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
    assert (out / "checkpoint.pth").is_file()
