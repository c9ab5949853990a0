import random

import pytest
from protocol_helpers import make_record


@pytest.fixture
def records():
    rng = random.Random(2024)
    return [make_record(i + 1, rng) for i in range(100)]
