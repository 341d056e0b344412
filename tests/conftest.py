import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

SAVED_MODELS = Path(__file__).resolve().parents[1] / "saved_models"


@pytest.fixture(scope="session")
def saved_models():
    """Folder of the committed example models."""
    return SAVED_MODELS
