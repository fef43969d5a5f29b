import pytest
import torch

# Tests use tiny models: one thread is fastest for them, and never oversubscribes the 2 cores of CI.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
