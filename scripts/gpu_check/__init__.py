"""GPU acceptance check: every CUDA path of dino_sparo exercised by one command, with a report of what it measured.

    bash scripts/gpu_check.sh [--dry-run] [REPORT_DIR]     # from the repository root; REPORT_DIR: gpu_report/

Parts, each with its own time limit, and the whole check bounded too (480 s, about 8 minutes, on one H200):
  1. environment        the GPU and its memory, torch / CUDA / cuDNN / NCCL / Triton versions, native bf16, compute
                        capability, the C compiler, /dev/shm, usable cores, TF32 and the attention kernel
  2. CUDA tests         ``pytest -m cuda``
  3. end to end         torchrun pretraining in bf16 (NCCL), stopped by SIGTERM mid-epoch and resumed; fp16 with a
                        GradScaler; k-NN and linear probe on GPU features; slot and head attention maps
  4. pretraining speed  main_dino.py, ViT-S/16 at ImageNet sizes on generated JPEGs for about a minute: images/s
                        and the share of time spent waiting for data
  5. throughput         the training step (reference-style baseline against ours, CLS and SPARO) and the
                        multi-worker data loader, whether the loader keeps up with the step, and last, in time
                        reserved for it, the step under torch.compile (running over that time is information only)

Every command runs in a session of its own and is killed, with everything it started, when it ends or runs over
its limit. REPORT_DIR/gpu_report.md and gpu_report.json are rewritten atomically after every command and every
benchmark row, so a hang or a kill later loses nothing already measured; full logs (and the benchmarks' JSON)
go to REPORT_DIR/logs/, and generated data, checkpoints and runs to a temporary folder removed at the end. The
summary table is printed last. Exit status: 0 when every part passed, 1 otherwise.

``--dry-run`` runs every part on the CPU with tiny sizes (CUDA hidden from the commands), to check the check
where there is no GPU. Only the standard library (and dino_sparo's standard-library utilities) is imported by the
check itself, so it starts and reports even when torch is broken: torch is imported by the commands it runs.

Modules: cli (command line), plan (sizes and time limits), supervisor (running commands within the budget),
report (parts, steps, Markdown and JSON), training_log (figures from log.txt and benchmark JSON), one module per
part, and probe / images, run as subprocesses because they need torch, numpy or PIL.
"""
