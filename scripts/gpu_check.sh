#!/usr/bin/env bash
# GPU acceptance check of dino_sparo, one command on a GPU machine with nothing to install:
#     bash scripts/gpu_check.sh [--dry-run] [REPORT_DIR]
# from the repository root. Everything else is in scripts/gpu_check.py; PYTHON picks another interpreter than
# the machine's python3 (the tests pass the one running them).
set -euo pipefail
exec "${PYTHON:-python3}" "$(dirname "${BASH_SOURCE[0]}")/gpu_check.py" "$@"
