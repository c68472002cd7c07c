import pytest
import torch

import fxeff  # noqa: F401  (loads the ops)

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def device():
    """The device of a test that takes `device`: "cpu" (ids unchanged) unless a GPU is present, where such tests
    are parametrized over DEVICES (pytest_generate_tests below); without one no CUDA case is collected."""
    return "cpu"


def pytest_generate_tests(metafunc):
    if "device" not in metafunc.fixturenames or len(DEVICES) == 1:
        return
    for marker in metafunc.definition.iter_markers("parametrize"):  # a test that parametrizes device itself
        names = marker.args[0]
        if "device" in ([n.strip() for n in names.split(",")] if isinstance(names, str) else list(names)):
            return
    metafunc.parametrize("device", DEVICES)


@pytest.fixture(autouse=True)
def _full_precision_float32():
    """cuDNN convolutions default to TF32 for float32 on a GPU: off in tests, so float32 tolerances mean float32."""
    previous = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32 = previous
