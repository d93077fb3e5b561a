"""A seeded chaos run: a tiny model trains for many short epochs while a seeded schedule of faults hits it (kill -9
at a step, kill -9 in the middle of a checkpoint write, SIGTERM to the whole process group, a corrupt image added
to the data folder between two launches), and a loop reruns the same command after each one, as a requeueing
scheduler would. Faults fire at counted steps and writes, never on a timer, so the run is the same on a loaded
machine.

What a user may count on afterwards: every epoch ran and is logged exactly once, every checkpoint on disk loads,
no temporary file is left, and the final teacher is bit for bit that of a run without faults. A corrupt image
changes the data set, so the run without faults sees each one added at the same epoch (it is restarted at that
epoch boundary, a resume proven exact by itself); an uninterrupted run cannot see a file that appears while it runs.
"""
from __future__ import annotations

import json
import random
import signal
import sys

import pytest
import torch
from helpers import TINY, assert_every_checkpoint_loads, environment, make_images, read, run, script, temporaries

from dino_sparo.errors import EXIT_PREEMPTED

# A short schedule of this generator that hits every kind of fault, each firing: a kill -9 in a checkpoint write, a
# corrupt image, four SIGTERMs to the group and a kill -9 at a step (seeds tried from 2000; shorter schedules that
# had every kind left their corrupt images waiting for an epoch boundary that never came).
CHAOS_SEED = 2000
FAULTS = 7
EPOCHS = 8
SAVE_EVERY = 4
IMAGES = 16
BATCH = 4  # TINY's --batch_size_per_gpu: 4 iterations per epoch, 5 once 4 corrupt images are in the folder
LAUNCH_TIMEOUT_S = 180


def chaos_schedule(seed: int, count: int) -> list[str]:
    """``count`` faults: fault-hook specs (``tests/faults/sitecustomize.py``) for one launch each, and
    ``corrupt`` for an unreadable image added to the data before the next launch."""
    rng = random.Random(seed)
    faults = []
    for _ in range(count):
        kind = rng.choices(["step", "save", "term", "corrupt"], weights=[4, 3, 4, 2])[0]
        if kind == "step":
            faults.append(f"kill:step={rng.randint(2, 6)}")
        elif kind == "save":
            faults.append(f"kill:save={rng.randint(1, 2)}")
        elif kind == "term":
            faults.append(f"group:SIGTERM:step={rng.randint(1, 6)}")
        else:
            faults.append("corrupt")
    return faults


def add_corrupt_image(data, number: int) -> None:
    """A file named as a PNG whose bytes are not one (a partial copy, say), the same bytes in every run."""
    content = random.Random(number).randbytes(200)
    (data / f"corrupt_{number}.png").write_bytes(b"\x89PNG\r\n\x1a\n" + content)


def next_epoch_at_a_boundary(out) -> int | None:
    """The epoch the next launch starts afresh, None when it resumes in the middle of one (whose data must not
    change under it)."""
    path = out / "checkpoint.pth"
    if not path.exists():
        return 0
    checkpoint = torch.load(path, weights_only=True)
    return None if checkpoint.get("iteration") else int(checkpoint["epoch"])


def command(data, out) -> list:
    return [*script("main_dino.py"), *TINY, "--data_path", data, "--output_dir", out, "--epochs", EPOCHS,
            "--saveckp_freq", SAVE_EVERY, "--num_workers", 1, "--seed", 3]


def launch(data, out, fault: str | None = None):
    return run(command(data, out), timeout=LAUNCH_TIMEOUT_S, env=environment(fault=fault) if fault else None)


def chaos_run(data, out) -> tuple[dict[str, int], list[int], int]:
    """Runs the schedule, then the same command until it finishes. Returns the faults that fired by kind, the
    epochs at which corrupt images were added, and the number of launches."""
    fired = {"kill -9 at a step": 0, "kill -9 in a checkpoint write": 0, "SIGTERM to the group": 0,
             "corrupt image": 0}
    corrupt_pending, corrupt_epochs, launches = 0, [], 0
    for fault in chaos_schedule(CHAOS_SEED, FAULTS):
        if fault == "corrupt":
            corrupt_pending += 1
        if corrupt_pending and launches and (epoch := next_epoch_at_a_boundary(out)) is not None:
            for _ in range(corrupt_pending):
                add_corrupt_image(data, len(corrupt_epochs))
                corrupt_epochs.append(epoch)
            fired["corrupt image"] += corrupt_pending
            corrupt_pending = 0
        if fault == "corrupt":
            continue
        completed = launch(data, out, fault)
        launches += 1
        if completed.returncode == 0:
            break  # finished before the fault's step or write came
        expected = EXIT_PREEMPTED if fault.startswith("group:") else -signal.SIGKILL
        assert completed.returncode == expected, (fault, completed.stderr[-3000:])
        assert "Traceback" not in completed.stderr, (fault, completed.stderr[-3000:])
        kind = ("SIGTERM to the group" if fault.startswith("group:") else
                "kill -9 in a checkpoint write" if "save=" in fault else "kill -9 at a step")
        fired[kind] += 1
    else:
        completed = launch(data, out)
        launches += 1
        assert completed.returncode == 0, completed.stderr[-3000:]
    return fired, corrupt_epochs, launches


def run_without_faults(data, out, corrupt_epochs: list[int]) -> None:
    """The same command with no fault, stopped (kill -9 at the first step) only where the chaos run's data
    changed, there given the same corrupt images."""
    done = 0
    for number, epoch in enumerate(corrupt_epochs):
        if epoch > done:
            steps = (epoch - done) * ((IMAGES + number) // BATCH)  # the epochs before this image was added
            stopped = launch(data, out, f"kill:step={steps + 1}")
            assert stopped.returncode == -signal.SIGKILL, stopped.stderr[-3000:]
            done = epoch
        add_corrupt_image(data, number)
    completed = launch(data, out)
    assert completed.returncode == 0, completed.stderr[-3000:]


@pytest.mark.slow
def test_a_seeded_chaos_run_finishes_logs_each_epoch_once_and_ends_on_the_teacher_of_a_run_without_faults(
        tmp_path):
    chaos_data = tmp_path / "chaos_data"
    make_images(chaos_data, count=IMAGES)
    chaos = tmp_path / "chaos"
    fired, corrupt_epochs, launches = chaos_run(chaos_data, chaos)

    epochs = [record["epoch"] for record in map(json.loads, read(str(chaos / "log.txt")).splitlines())]
    assert epochs == list(range(EPOCHS))
    checkpoints = assert_every_checkpoint_loads(chaos)
    # checkpoint.pth, then the copy of every 4th epoch's (epochs 0, 4, ...: the next epoch to run is saved)
    assert [c["epoch"] for c in checkpoints] == [EPOCHS, *range(1, EPOCHS, SAVE_EVERY)]
    assert temporaries(chaos) == []
    skipped = sum(json.loads(line)["skipped_images"] for line in read(str(chaos / "log.txt")).splitlines())
    assert corrupt_epochs and skipped > 0  # the corrupt images were met, and passed over

    clean_data = tmp_path / "clean_data"
    make_images(clean_data, count=IMAGES)
    clean = tmp_path / "clean"
    run_without_faults(clean_data, clean, corrupt_epochs)
    final, reference = checkpoints[0], torch.load(clean / "checkpoint.pth", weights_only=True)
    differing = [name for name, value in reference["teacher"].items() if not torch.equal(value, final["teacher"][name])]
    assert differing == []
    assert torch.equal(final["dino_loss"]["center"], reference["dino_loss"]["center"])

    assert sum(fired.values()) == FAULTS, fired  # the schedule was spent, not cut short by the run's end
    assert all(fired.values()), fired  # every kind of fault fired
    print(f"chaos run (seed {CHAOS_SEED}): {FAULTS} faults injected "
          f"({', '.join(f'{count} {kind}' for kind, count in fired.items())}), {launches - 1} restarts, "
          f"{EPOCHS} epochs; passed: every epoch logged once, {len(checkpoints)} checkpoints load, no temporary "
          f"file, {skipped} unreadable images skipped, teacher and centre bit-identical to the run without faults",
          file=sys.stderr)
