"""``python -m gpu_check`` (what scripts/gpu_check.sh runs, with scripts/ and the repository on PYTHONPATH)."""
import sys

from .cli import main

sys.exit(main(sys.argv[1:]))
