"""Test-suite settings: offline hub, deterministic torch, fast Hypothesis profile."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

# One torch thread: the CI machine has 2 cores and some tests spawn processes; oversubscribed
# intra-op threads make small-tensor tests tens of times slower there.
torch.set_num_threads(1)

settings.register_profile(
    "rlcredit", deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow], max_examples=50
)
settings.load_profile("rlcredit")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
