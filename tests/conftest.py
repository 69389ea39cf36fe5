"""Test set-up. TRITON_INTERPRET must be set before any @triton.jit runs, so kernels execute on the CPU."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing in the tests may download

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

SHARED = Path(__file__).resolve().parents[2] / "shared"
STORIES = SHARED / "models" / "stories260K"

torch.set_num_threads(1)  # tiny models: OpenMP start-up costs more than it saves, and CI has 2 cores


@pytest.fixture(scope="session")
def stories_model():
    """The real 260K-parameter Llama of ../shared (float64, so argmax near-ties cannot flip); skipped if absent."""
    if not (STORIES / "model.safetensors").exists():
        pytest.skip("../shared/models/stories260K is absent")
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(STORIES, dtype=torch.float64).eval()
