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
