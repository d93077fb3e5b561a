"""GPU acceptance check: every CUDA path of dino_sparo exercised by one command, with a report of what it measured.

    bash scripts/gpu_check.sh [--dry-run] [--parts PARTS] [REPORT_DIR]   # from the repository root

Parts, each with its own cap, the caps adding up to the whole check's window (7 minutes on one H200, the last
90 s of it kept for torch.compile; see :mod:`gpu_check.plan`):
  1. environment        the GPU and its memory, torch / CUDA / cuDNN / NCCL / Triton versions, native bf16, compute
                        capability, the C compiler, /dev/shm, usable cores, TF32 and the attention kernel
  2. CUDA tests         ``pytest -m cuda`` over the test modules that mark tests cuda
  3. end to end         torchrun pretraining in bf16 (NCCL), stopped by SIGTERM mid-epoch and resumed; fp16 with a
                        GradScaler; k-NN and linear probe on GPU features; slot and head attention maps
  4. pretraining speed  main_dino.py, ViT-S/16 at ImageNet sizes on generated JPEGs for about 45 s: images/s and
                        the share of time spent waiting for data
  5. throughput         the training step (reference-style baseline against ours, CLS and SPARO) and the
                        multi-worker data loader, whether the loader keeps up with the step, and last, in time
                        reserved for it, the step under torch.compile (running over that time is information only)
``--parts 3,throughput`` runs only those parts (by number or name), within their caps, and reports the others as
not selected: a failed part can be rerun alone.

Every command runs in a session of its own and is killed, with everything it started, when it ends or runs over
its limit. REPORT_DIR receives four files and nothing else: gpu_report.md and gpu_report.json, rewritten
atomically after every command and every benchmark row, so that a hang or a kill later loses nothing already
measured; console.log, what the check printed; and logs.tgz, every command's full log and the benchmarks' JSON,
archived after every command and every 30 s while one runs. Logs, generated data, checkpoints and runs are written
to a temporary folder, removed at the end. The summary table is printed last. Exit status: 0 when every selected
part passed, 1 otherwise.

``--dry-run`` runs every part on the CPU with tiny sizes (CUDA hidden from the commands), to check the check
where there is no GPU. Only the standard library (and the repository's standard-library utilities) is imported by
the check itself, so it starts and reports even when torch is broken: torch is imported by the commands it runs,
with the interpreter ``PYTHON`` names (as scripts/gpu_check.sh does), else the check's own.

Modules: cli (command line), plan (sizes and time limits), supervisor (running commands within the budget),
report (parts, steps, Markdown and JSON), training_log (figures from log.txt and benchmark JSON), one module per
part, and probe / images, run as subprocesses because they need torch, numpy or PIL. How it works, in full:
docs/gpu_check.md.
"""
