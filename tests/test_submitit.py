import pytest
import torch
from helpers import TINY, kill_tree, make_images, wait_until

# The GPU machines have no submitit: skip these there instead of failing the collection.
submitit = pytest.importorskip("submitit")
import run_with_submitit  # noqa: E402


def test_launcher_flags_and_defaults():
    args = run_with_submitit.parse_args(["--data_path", "x"])
    assert (args.ngpus, args.nodes, args.timeout, args.partition, args.use_volta32, args.comment) == \
        (8, 2, 2800, None, False, "")
    assert args.output_dir == ""
    config = run_with_submitit.resolve_config(args)
    assert config.model.arch == "vit_small" and config.model.readout == "sparo" and config.lr == 0.0005


def test_checkpoint_requeues_the_same_training(tmp_path):
    args = run_with_submitit.parse_args(["--data_path", "x", "--output_dir", str(tmp_path / "run"), "--lr", "0.1"])
    trainer = run_with_submitit.Trainer(args)
    requeued = trainer.checkpoint()
    assert isinstance(requeued, submitit.helpers.DelayedSubmission)
    assert isinstance(requeued.function, run_with_submitit.Trainer)
    assert requeued.function.args.output_dir == str(tmp_path / "run") and requeued.function.args.lr == 0.1


@pytest.mark.slow
def test_local_executor_trains_on_cpu(tmp_path):
    data = make_images(tmp_path / "data", count=8)
    job = run_with_submitit.main([*TINY, "--data_path", data, "--epochs", "1", "--cluster", "local", "--ngpus", "0",
                                  "--nodes", "1", "--timeout", "10", "--cpus_per_task", "1",
                                  "--shared_dir", str(tmp_path / "shared")])
    try:
        wait_until(job.done, timeout=240, interval=0.5)
        job.result()  # raises if the job failed
    finally:
        kill_tree(job._process.pid)  # the local executor's controller and its task, if still running
    output_dir = tmp_path / "shared" / str(job.job_id)  # outputs go to the job's folder under shared_dir
    checkpoint = torch.load(output_dir / "checkpoint.pth", weights_only=True)
    assert checkpoint["epoch"] == 1
    assert "Epoch 0 done" in job.stdout()
