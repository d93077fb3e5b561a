"""Launches main_dino.py training on Slurm through submitit, requeued on preemption or timeout.

Example: ``python run_with_submitit.py --nodes 2 --ngpus 8 --data_path /path/train --arch vit_small``.
Jobs write under ``--shared_dir`` (default ``$DINO_SPARO_SHARED``, else ``./experiments``) in a folder named
after the job id unless ``--output_dir`` is given; a requeued job resumes from its ``checkpoint.pth``.
"""
from __future__ import annotations

import argparse
import logging
import os
import signal
from collections.abc import Sequence

import submitit

from dino_sparo.cli import BARE_IS_TRUE, bool_flag
from dino_sparo.distributed import destroy_distributed
from dino_sparo.errors import Preempted, UserError, run_cli
from dino_sparo.logger import setup_logging
from dino_sparo.train import train_dino
from dino_sparo.train.config import parse_args as parse_training_args
from dino_sparo.train.config import resolve_config
from dino_sparo.train.flags import get_args_parser as training_args_parser

CODE_DIR = os.path.dirname(os.path.abspath(__file__))
logger = logging.getLogger("dino_sparo.submitit")


def get_args_parser() -> argparse.ArgumentParser:
    """main_dino.py's flags plus the launcher's."""
    parser = training_args_parser()
    parser.prog, parser.description = "run_with_submitit.py", "Submitit launcher for DINO-SPARO pretraining"
    group = parser.add_argument_group("submitit / Slurm")
    group.add_argument("--ngpus", type=int, default=8, help="GPUs (and training processes) per node")
    group.add_argument("--nodes", type=int, default=2, help="number of nodes")
    group.add_argument("--timeout", type=int, default=2800, help="job time limit in minutes")
    group.add_argument("--partition", default=None, help="Slurm partition (default: the cluster's)")
    group.add_argument("--use_volta32", type=bool_flag, **BARE_IS_TRUE, default=False,
                       help="request 32 GB V100s (constraint volta32gb)")
    group.add_argument("--comment", default="", help="Slurm comment, e.g. for priority requests")
    group.add_argument("--shared_dir", default=os.environ.get("DINO_SPARO_SHARED") or os.path.abspath("experiments"),
                       help="shared folder for job logs and, by default, outputs (env DINO_SPARO_SHARED)")
    group.add_argument("--cpus_per_task", type=int, default=10, help="CPU cores per training process")
    group.add_argument("--mem_per_gpu_gb", type=int, default=40, help="host memory per GPU in GB")
    group.add_argument("--job_name", default="dino_sparo", help="Slurm job name")
    group.add_argument("--cluster", choices=("slurm", "local", "debug"), default=None,
                       help="submitit executor: slurm (default when available), local (subprocesses on this "
                       "machine, e.g. CPU tests) or debug (in this process)")
    parser.set_defaults(output_dir="")
    return parser


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The flags (over their ``--config`` recipe) of main_dino.py and the launcher."""
    return parse_training_args(argv, get_args_parser())


class Trainer:
    """The submitted callable; submitit calls :meth:`checkpoint` on preemption or timeout to requeue it.

    It carries the parsed flags, not a resolved config: defaults that depend on the machine (the device, the
    precision) are decided on the compute node, where training runs."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args

    def __call__(self) -> None:
        output_dir = self._setup_environment()
        try:
            train_dino(resolve_config(argparse.Namespace(**{**vars(self.args), "output_dir": output_dir})))
        except Preempted as stop:
            # Training caught the signal, saved the current state and gave submitit's handler back: calling
            # it now requeues the job from the main task (through checkpoint() below) and exits.
            logger.info(str(stop), extra={"all_ranks": True})
            requeue_signal = submitit.JobEnvironment._usr_sig()
            requeue = signal.getsignal(requeue_signal)
            if callable(requeue):
                requeue(stop.signum or requeue_signal, None)
            raise
        finally:
            destroy_distributed()

    def checkpoint(self) -> submitit.helpers.DelayedSubmission:
        # checkpoint.pth in output_dir is what the requeued job resumes from: written at the interrupted
        # iteration when training could stop in time, else the one of the last finished epoch.
        logger.info(f"requeuing: training resumes from the checkpoint.pth in {self.args.output_dir} (%j: this job)",
                    extra={"all_ranks": True})
        return submitit.helpers.DelayedSubmission(type(self)(self.args))

    def _setup_environment(self) -> str:
        """Exports the process group's variables; returns the output folder, the job's id in place of %j."""
        job_env = submitit.JobEnvironment()
        if job_env.num_tasks > 1:
            # MASTER_ADDR/PORT, RANK, WORLD_SIZE, LOCAL_RANK for env:// initialisation.
            submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False, overwrite=True)
        setup_logging(job_env.global_rank)
        logger.info(f"process {job_env.global_rank} of {job_env.num_tasks} on {job_env.hostname}",
                    extra={"all_ranks": True})
        return self.args.output_dir.replace("%j", str(job_env.job_id))


def submit(args: argparse.Namespace) -> submitit.Job:
    """Checks the flags here (a bad value fails now, not in the queue) and submits the training job."""
    args = argparse.Namespace(**{**vars(args), "output_dir": args.output_dir or os.path.join(args.shared_dir, "%j")})
    # The machine's defaults (device, precision) are decided on the compute node; every other value is checked here.
    resolve_config(argparse.Namespace(**{**vars(args), "device": "cpu", "precision": "fp32", "use_fp16": None}))
    try:
        os.makedirs(args.shared_dir, exist_ok=True)
    except OSError as error:
        raise UserError(f"cannot create --shared_dir {args.shared_dir}: {error.strerror}") from None
    # The jobs import this repository's modules: they inherit this variable (sbatch exports the environment), so
    # they need no `pip install -e .` on the compute nodes.
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [CODE_DIR, os.environ.get("PYTHONPATH")]))
    executor = submitit.AutoExecutor(folder=os.path.join(args.shared_dir, "%j"), cluster=args.cluster,
                                     slurm_max_num_timeout=30)
    tasks_per_node = max(1, args.ngpus)
    extra = {}
    if args.partition:
        extra["slurm_partition"] = args.partition
    if args.use_volta32:
        extra["slurm_constraint"] = "volta32gb"
    if args.comment:
        extra["slurm_comment"] = args.comment
    executor.update_parameters(
        name=args.job_name, mem_gb=args.mem_per_gpu_gb * tasks_per_node, gpus_per_node=args.ngpus,
        tasks_per_node=tasks_per_node, cpus_per_task=args.cpus_per_task, nodes=args.nodes,
        timeout_min=args.timeout, slurm_signal_delay_s=120, **extra)
    job = executor.submit(Trainer(args))
    logger.info(f"submitted job {job.job_id}; logs in {os.path.join(args.shared_dir, str(job.job_id))}")
    return job


def main(argv: Sequence[str] | None = None) -> submitit.Job:
    setup_logging()
    return submit(parse_args(argv))


if __name__ == "__main__":
    run_cli(main)
