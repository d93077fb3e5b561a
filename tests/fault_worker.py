"""main_dino.py with one injected failure, for tests/test_faults_distributed.py: the process whose rank is
``$FAULT_RANK`` raises at ``$FAULT_AT`` ("setup": while building the models, before the first collective of
DistributedDataParallel; "step": in its second optimisation step, while the other rank is inside collectives)."""
import os
import runpy
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import dino_sparo.train as train  # noqa: E402


def inject() -> None:
    if os.environ.get("RANK") != os.environ["FAULT_RANK"]:
        return
    if os.environ["FAULT_AT"] == "setup":
        def failing_build(*args, **kwargs):
            raise RuntimeError("injected fault while building the models")
        train.build_models = failing_build
        return
    calls = []
    original = train.update_teacher

    def failing_update(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("injected fault in the second step")
        return original(*args, **kwargs)
    train.update_teacher = failing_update


if __name__ == "__main__":
    inject()
    sys.argv = [os.path.join(ROOT, "main_dino.py"), *sys.argv[1:]]
    runpy.run_path(sys.argv[0], run_name="__main__")
