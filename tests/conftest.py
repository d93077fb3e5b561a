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
