"""Probes that need torch, run by the check as subprocesses (``python -m gpu_check.probe WHAT ...``), each printing
one JSON line as its last output:

    machine                 the machine, torch's build, the GPU and its math settings (benchmarks.machine)
    checkpoint PATH         where a main_dino.py checkpoint stands: {"epoch": E, "iteration": I}
"""
from __future__ import annotations

import json
import sys

from benchmarks.machine import describe_machine


def checkpoint_position(path: str) -> dict[str, int]:
    """The epoch a checkpoint resumes at and, for one a preempted run wrote mid-epoch, the iteration (else 0)."""
    import torch

    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    return {"epoch": int(checkpoint["epoch"]), "iteration": int(checkpoint.get("iteration", 0))}


def main(argv: list[str]) -> int:
    if argv == ["machine"]:
        print(json.dumps(describe_machine()))
    elif len(argv) == 2 and argv[0] == "checkpoint":
        print(json.dumps(checkpoint_position(argv[1])))
    else:
        print(f"usage: python -m gpu_check.probe machine | checkpoint PATH (got {' '.join(argv) or 'nothing'})",
              file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
