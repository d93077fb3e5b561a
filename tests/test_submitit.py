import pytest

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
