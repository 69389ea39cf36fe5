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


def _patch_language_once_per_launch() -> None:
    """Triton's interpreter re-patches the language modules a @triton.jit function sees (an `inspect.getmembers`
    scan, ~0.4 ms) on every call of a helper inside a kernel, though the launch has patched them for its whole run:
    about a third of a native forward's time under the interpreter. Inside a launch, a helper whose modules are all
    patched already skips the repeat (one that sees another module, as Triton's own helpers see
    `triton.language.core`, patches it as before). A Triton without these internals is left as it is."""
    try:
        from triton.runtime import interpreter
    except ImportError:
        return
    grid, function = getattr(interpreter, "GridExecutor", None), getattr(interpreter, "InterpretedFunction", None)
    if grid is None or function is None or not all(hasattr(interpreter, name) for name in ("_patch_lang", "tl")):
        return
    launch, helper, patch = grid.__call__, function.__call__, interpreter._patch_lang
    languages = (interpreter.tl, interpreter.tl.core)
    patched: list[set[int]] = []  # per launch running, the language modules patched in it

    seen_by: dict[int, set[int]] = {}

    def modules(fn) -> set[int]:
        found = seen_by.get(id(fn))
        if found is None:
            found = seen_by[id(fn)] = {id(value) for value in fn.__globals__.values()
                                       if any(value is lang for lang in languages)}
        return found

    def launch_once(self, *args, **kwargs):
        patched.append(set(modules(self.fn)))
        try:
            return launch(self, *args, **kwargs)
        finally:
            patched.pop()

    def helper_call(self, *args, **kwargs):
        if not patched:
            return helper(self, *args, **kwargs)
        seen = modules(self.fn)
        if not seen <= patched[-1]:
            patch(self.fn)
            patched[-1] |= seen
        try:
            return self.rewrite()(*args, **kwargs)
        except Exception as error:
            raise interpreter.InterpreterError(repr(error)) from error

    grid.__call__, function.__call__ = launch_once, helper_call


if os.environ["TRITON_INTERPRET"] == "1":
    _patch_language_once_per_launch()


@pytest.fixture(scope="session")
def stories_model():
    """The real 260K-parameter Llama of ../shared (float64, so argmax near-ties cannot flip); skipped if absent."""
    if not (STORIES / "model.safetensors").exists():
        pytest.skip("../shared/models/stories260K is absent")
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(STORIES, dtype=torch.float64).eval()
