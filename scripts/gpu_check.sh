#!/usr/bin/env bash
# GPU acceptance check of dino_sparo, one command on a GPU machine with nothing to install:
#     bash scripts/gpu_check.sh [--dry-run] [--parts PARTS] [REPORT_DIR]
# from the repository root. REPORT_DIR receives gpu_report.md, gpu_report.json, console.log and logs.tgz, nothing
# else. Everything else is in the package scripts/gpu_check/; PYTHON picks another interpreter than the machine's
# python3, for the check and the commands it runs (the tests pass the one running them).
set -euo pipefail
scripts="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
export PYTHONPATH="${scripts}:$(dirname "${scripts}")${PYTHONPATH:+:${PYTHONPATH}}"
exec "${PYTHON:-python3}" -m gpu_check "$@"
