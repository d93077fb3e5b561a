import os

import pytest
import torch

# Under pytest-xdist (`pytest -n N`) the workers share the cores: each gets its part, as the scripts the tests run
# get one thread (helpers.environment), so that no worker's ops wait on threads another worker's ops displaced.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _WORKERS > 1:
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // _WORKERS))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture(autouse=True, scope="session")
def _package_logging():
    """What every entry point does first: the package's messages reach stdout/stderr (pytest's capture)."""
    from dino_sparo.logger import setup_logging

    setup_logging(0)


@pytest.fixture(scope="session")
def gloo_pair():
    """Two spawned processes shared by the multi-process tests (see helpers.GlooPair)."""
    from helpers import GlooPair

    pair = GlooPair()
    yield pair
    pair.close()


@pytest.fixture(scope="session")
def inductor_cache(tmp_path_factory):
    """One inductor cache folder for the whole test session (all xdist workers), in this process's environment and
    passed on to the scripts the tests run, so that a graph another test already compiled is read back instead of
    compiled again."""
    session_folder = tmp_path_factory.getbasetemp()
    if _WORKERS > 1:  # each worker's folder lies in the session's
        session_folder = session_folder.parent
    folder = session_folder / "inductor_cache"
    folder.mkdir(exist_ok=True)
    previous = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(folder)
    yield folder
    if previous is None:
        os.environ.pop("TORCHINDUCTOR_CACHE_DIR", None)
    else:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = previous
