"""Test-only fault injection at a known point, for the fault tests' subprocesses (main_dino.py, its torchrun
workers, submitit jobs). Python imports this module at start-up when this folder is on PYTHONPATH
(``helpers.environment(fault=...)`` puts it there); it does nothing unless ``DINO_SPARO_FAULT`` is set:

    signal:SIGTERM:step=3   send the signal to this process at the start of its 3rd optimisation step
    group:SIGTERM:step=3    have another process (kill) send it to this process's whole process group, as
                            torchrun and Slurm do: DataLoader workers get it from a process that is not
                            their parent (torch's workers exit quietly only on their parent's SIGTERM)
    kill:step=6             SIGKILL this process at the start of its 6th step
    kill:save=1             SIGKILL this process halfway through writing its 1st file with save_atomic
    raise:step=2            raise RuntimeError("injected fault ...") at the start of its 2nd step
    raise:setup             raise RuntimeError("injected fault ...") while the models are built

``DINO_SPARO_FAULT_RANK`` limits the fault to the process of that ``RANK``; ``DINO_SPARO_FAULT_ONCE`` names a
marker file: the fault fires only if it does not exist yet, and creates it (so a requeued job runs clean).
Faults at a counted step replace timers, so the tests pass the same way on a loaded machine.
"""
import os
import signal


def _armed() -> bool:
    wanted_rank = os.environ.get("DINO_SPARO_FAULT_RANK")
    if wanted_rank is not None and os.environ.get("RANK", "0") != wanted_rank:
        return False
    marker = os.environ.get("DINO_SPARO_FAULT_ONCE")
    return not (marker and os.path.exists(marker))


def _fire(action: str, signal_name: str | None) -> None:
    marker = os.environ.get("DINO_SPARO_FAULT_ONCE")
    if marker:
        open(marker, "w").close()
    if action == "raise":
        raise RuntimeError(f"injected fault ({os.environ['DINO_SPARO_FAULT']})")
    if action == "group":
        import subprocess

        subprocess.run(["kill", "-s", signal_name.removeprefix("SIG"), "--", f"-{os.getpgid(0)}"], check=True,
                       start_new_session=True)
    else:
        os.kill(os.getpid(), signal.SIGKILL if action == "kill" else signal.Signals[signal_name])


def _install(spec: str) -> None:
    parts = spec.split(":")
    action, where = parts[0], parts[-1]
    signal_name = parts[1] if action in ("signal", "group") else None
    if where == "setup":
        import dino_sparo.train.trainer as train

        original_build = train.build_models

        def failing_build(*args, **kwargs):
            if _armed():
                _fire(action, signal_name)
            return original_build(*args, **kwargs)

        train.build_models = failing_build
        return
    counter, count = where.split("=")
    count = int(count)
    calls = [0]
    if counter == "step":
        from dino_sparo.train.step import TrainStep

        original_step = TrainStep.__call__

        def faulty_step(self, *args, **kwargs):
            calls[0] += 1
            if calls[0] == count and _armed():
                _fire(action, signal_name)
            return original_step(self, *args, **kwargs)

        TrainStep.__call__ = faulty_step
        return
    import io

    import torch

    import dino_sparo.checkpoint as checkpoint
    from dino_sparo.utils.files import temporary_path

    original_save = checkpoint.save_atomic

    def save_killed_halfway(obj, path):
        calls[0] += 1
        if calls[0] == count and _armed():
            buffer = io.BytesIO()
            torch.save(obj, buffer)
            with open(temporary_path(path), "wb") as handle:
                handle.write(buffer.getvalue()[: len(buffer.getvalue()) // 2])
                handle.flush()
                os.fsync(handle.fileno())
            _fire(action, signal_name)
        return original_save(obj, path)

    checkpoint.save_atomic = save_killed_halfway


if os.environ.get("DINO_SPARO_FAULT"):
    _install(os.environ["DINO_SPARO_FAULT"])
