"""The saved tiny diffusers models, built once per test session (only where diffusers is installed)."""

import pytest


@pytest.fixture(scope="session")
def saved(tmp_path_factory):
    """The directory holding unet/, ddpm/, dit/ and flow/ (``save_tiny_models``)."""
    pytest.importorskip("diffusers")
    from tests.adapters.diffusers_models import save_tiny_models
    return save_tiny_models(tmp_path_factory.mktemp("diffusers"))
