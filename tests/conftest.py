import os

import pytest
import torch

# Without a GPU the Triton kernels run under the interpreter; it must be on before triton loads.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def pytest_collection_modifyitems(config, items):
    for item in items:
        if "cuda" in item.name:
            item.add_marker(pytest.mark.gpu)


@pytest.fixture(params=DEVICES)
def device(request):
    return torch.device(request.param)
