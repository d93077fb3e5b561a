"""Test-only fault injection at a known point, for the fault tests' subprocesses (main_dino.py, its torchrun
workers, submitit jobs). Python imports this module at start-up when this folder is on PYTHONPATH
(``helpers.environment(fault=...)`` puts it there); it does nothing unless ``DINO_SPARO_FAULT`` is set:

    signal:SIGTERM:step=3   send the signal to this process at the start of its 3rd optimisation step
    group:SIGTERM:step=3    have another process (kill) send it to this process's whole process group, as
                            torchrun and Slurm do: DataLoader workers get it from a process that is not
                            their parent (torch's workers exit quietly only on their parent's SIGTERM)
    kill:step=6             SIGKILL this process at the start of its 6th step
    agent:step=2            SIGKILL this process's parent (its torchrun agent), then this process, at the start of
                            its 2nd step: what a node that dies looks like to the rest of the job
    kill:save=1             SIGKILL this process halfway through writing its 1st file with save_atomic
    raise:step=2            raise RuntimeError("injected fault ...") at the start of its 2nd step
    raise:setup             raise RuntimeError("injected fault ...") while the models are built
    oom:step=2              raise torch.OutOfMemoryError (as CUDA does) at the start of its 2nd step
    enospc:save=2           its 2nd save_atomic write fails with ENOSPC after 64 KiB, as on a full disk
    rmdir:save=2            the folder of its 2nd save_atomic file is deleted just before that write
    readonly:save=2         its 2nd save_atomic write fails with EROFS, as on a file system remounted read-only

``DINO_SPARO_FAULT_RANK`` limits the fault to the process of that ``RANK``; ``DINO_SPARO_FAULT_ONCE`` names a
marker file: the fault fires only if it does not exist yet, and creates it (so a requeued job runs clean).
Faults at a counted step replace timers, so the tests pass the same way on a loaded machine.

Besides faults, ``DINO_SPARO_COMPILE_BACKEND`` (e.g. ``aot_eager``) makes ``--compile`` use that torch.compile
backend: a multi-process test of how compiled blocks train, save and resume is then not dominated by inductor
generating and building C++ code in every process.
"""
import os
import signal


def _armed() -> bool:
    wanted_rank = os.environ.get("DINO_SPARO_FAULT_RANK")
    if wanted_rank is not None and os.environ.get("RANK", "0") != wanted_rank:
        return False
    marker = os.environ.get("DINO_SPARO_FAULT_ONCE")
    return not (marker and os.path.exists(marker))


def _mark_fired() -> None:
    marker = os.environ.get("DINO_SPARO_FAULT_ONCE")
    if marker:
        open(marker, "w").close()


def _fire(action: str, signal_name: str | None) -> None:
    _mark_fired()
    if action == "raise":
        raise RuntimeError(f"injected fault ({os.environ['DINO_SPARO_FAULT']})")
    if action == "oom":
        import torch

        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (injected fault)")
    if action == "agent":
        os.kill(os.getppid(), signal.SIGKILL)
        os.kill(os.getpid(), signal.SIGKILL)
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
        import dino_sparo.train.build as train

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

    if action != "kill":
        _install_write_failure(action, count)
        return
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


class _FillingDisk:
    """A file handle on a disk that is full after ``room`` more bytes."""

    def __init__(self, handle, room: int) -> None:
        self.handle, self.room = handle, room

    def write(self, data) -> int:
        if len(data) > self.room:
            import errno

            raise OSError(errno.ENOSPC, "No space left on device")
        self.room -= len(data)
        return self.handle.write(data)

    def flush(self) -> None:
        self.handle.flush()


def _install_write_failure(action: str, count: int) -> None:
    """The ``count``-th write of save_atomic (through ``write_atomic_or_explain``) meets a full disk, a deleted
    folder or a read-only file system; the code under test handles the error itself."""
    import errno
    import shutil

    import dino_sparo.checkpoint as checkpoint

    original_write = checkpoint.write_atomic_or_explain
    calls = [0]

    def failing_write(path, write, needed_bytes):
        calls[0] += 1
        if calls[0] != count or not _armed():
            return original_write(path, write, needed_bytes)
        _mark_fired()
        if action == "enospc":
            return original_write(path, lambda handle: write(_FillingDisk(handle, 64 * 1024)), needed_bytes)
        if action == "rmdir":
            folder = os.path.dirname(os.path.abspath(path))
            # TensorBoard's writer thread reopens its events file by name to append: it can put a file back while
            # the tree is being removed ("Directory not empty"), so remove until the folder is gone
            for _ in range(100):
                shutil.rmtree(folder, ignore_errors=True)
                if not os.path.exists(folder):
                    break
            return original_write(path, write, needed_bytes)

        def read_only(handle):
            raise OSError(errno.EROFS, "Read-only file system", os.fspath(path))

        return original_write(path, read_only, needed_bytes)

    checkpoint.write_atomic_or_explain = failing_write


if os.environ.get("DINO_SPARO_FAULT"):
    _install(os.environ["DINO_SPARO_FAULT"])
if os.environ.get("DINO_SPARO_COMPILE_BACKEND"):
    from dino_sparo.models.backbone import ReadoutBackbone

    _compile_blocks = ReadoutBackbone.compile_blocks
    ReadoutBackbone.compile_blocks = lambda self, backend=os.environ["DINO_SPARO_COMPILE_BACKEND"]: \
        _compile_blocks(self, backend)
