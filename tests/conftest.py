import os

import pytest
import torch


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
    """One inductor cache folder for the whole test session, in this process's environment and passed on to the
    scripts the tests run, so that a graph another test already compiled is read back instead of compiled again."""
    folder = tmp_path_factory.getbasetemp() / "inductor_cache"
    folder.mkdir(exist_ok=True)
    previous = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(folder)
    yield folder
    if previous is None:
        os.environ.pop("TORCHINDUCTOR_CACHE_DIR", None)
    else:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = previous
