"""The CPU linear kernel (`specdec.backends.cpu_linear`): the choice, the scoped swap and losslessness with it."""

import pytest
import torch

import specdec.backends.cpu_linear as cpu_linear
from specdec import SpeculativeGenerator
from specdec.backends.cpu_linear import LinearKernel, onednn_available, weight_shapes
from specdec.backends.hf import HFBackend
from specdec.controllers.cost import cost_key
from specdec.reference import reference_decode
from specdec.sampling import SamplingParams
from specdec.stopping import StopRule
from specdec.tree import DraftTree
from tiny_models import VOCAB, fresh_tiny_model, repetitive_prompt, single_thread

needs_onednn = pytest.mark.skipif(not onednn_available(), reason="this torch build has no oneDNN")


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    with single_thread():
        yield


def float_model(arch: str = "llama"):
    return fresh_tiny_model(arch).float()


def test_unknown_kernel_is_a_clear_error_naming_the_choices():
    with pytest.raises(ValueError, match="auto, aten, onednn"):
        LinearKernel(float_model(), "mkl")


@needs_onednn
def test_onednn_refuses_models_it_does_not_run():
    with pytest.raises(ValueError, match="float32"):
        LinearKernel(fresh_tiny_model("llama"), "onednn")  # float64
    with pytest.raises(ValueError, match="float32"):
        LinearKernel(float_model().bfloat16(), "onednn")


def test_auto_keeps_aten_for_small_or_non_float32_models_without_timing(monkeypatch):
    def not_called(*args):
        raise AssertionError("auto timed the kernels of a model it should not")

    monkeypatch.setattr(cpu_linear, "time_kernels", not_called)
    assert LinearKernel(float_model(), "auto").name == "aten"  # ~0.1 M parameters, below AUTO_MIN_PARAMS
    monkeypatch.setattr(cpu_linear, "AUTO_MIN_PARAMS", 0)
    assert LinearKernel(fresh_tiny_model("llama"), "auto").name == "aten"  # float64


@needs_onednn
@pytest.mark.parametrize("answer", ["onednn", "aten"])
def test_auto_takes_the_timed_choice_once_and_keeps_it_on_disk(monkeypatch, tmp_path, answer):
    monkeypatch.setattr(cpu_linear, "AUTO_MIN_PARAMS", 0)
    monkeypatch.setattr(cpu_linear, "_CHOSEN", {})
    monkeypatch.setenv("SPECDEC_COST_CACHE", str(tmp_path / "costs"))
    timed = []
    monkeypatch.setattr(cpu_linear, "time_kernels", lambda linears: timed.append(linears) or (answer, {}))
    assert LinearKernel(float_model(), "auto").name == answer
    assert len(timed) == 1 and len(timed[0]) == 15  # 2 layers x 7 projections + the LM head
    (saved,) = (tmp_path / "linear").glob("*.json")
    cpu_linear._CHOSEN.clear()
    assert LinearKernel(float_model(), "auto").name == answer and len(timed) == 1  # read back, not timed again
    saved.write_text("{not json")
    cpu_linear._CHOSEN.clear()
    assert LinearKernel(float_model(), "auto").name == answer and len(timed) == 2  # a corrupt file: timed again


def test_weight_shapes_counts_layers_per_shape():
    linears = [torch.nn.Linear(3, 5), torch.nn.Linear(3, 5, bias=False), torch.nn.Linear(5, 3)]
    assert weight_shapes(linears) == ((3, 5, 1), (5, 3, 2))


@needs_onednn
def test_time_kernels_times_every_layer_with_both_kernels():
    linears = [torch.nn.Linear(32, 64), torch.nn.Linear(64, 32)]
    choice, seconds = cpu_linear.time_kernels(linears, reps=1)
    assert choice in ("aten", "onednn") and set(seconds) == {"aten", "onednn"}
    assert all(value > 0 for value in seconds.values())
    assert (choice == "onednn") == (seconds["onednn"] <= cpu_linear.AUTO_MARGIN * seconds["aten"])


@needs_onednn
def test_the_swap_is_scoped_and_close_to_aten():
    model = float_model()
    kernel = LinearKernel(model, "onednn")
    ids = torch.tensor([repetitive_prompt(VOCAB)])
    with torch.inference_mode():
        before = model(ids).logits
        with kernel.active():
            assert all("forward" in module.__dict__ for module in kernel.linears)
            swapped = model(ids).logits
        assert not any("forward" in module.__dict__ for module in kernel.linears)
        assert torch.equal(model(ids).logits, before)
    torch.testing.assert_close(swapped, before, rtol=1e-4, atol=1e-4)


@needs_onednn
def test_the_swap_is_undone_when_the_forward_raises():
    kernel = LinearKernel(float_model(), "onednn")
    with pytest.raises(RuntimeError, match="boom"):
        with kernel.active():
            raise RuntimeError("boom")
    assert not any("forward" in module.__dict__ for module in kernel.linears)


@needs_onednn
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_speculative_output_with_onednn_equals_ar_with_onednn(arch):
    model = float_model(arch)
    prompt = repetitive_prompt(VOCAB, seed=3, length=40)
    truth = reference_decode(HFBackend(model, "onednn"), prompt, SamplingParams(), StopRule(48))
    for drafter in ("ngram", "copyspec"):
        generator = SpeculativeGenerator(model, drafter=drafter, controller="static:max_depth=6",
                                         backend=HFBackend(model, "onednn"))
        out = generator.generate(prompt, max_new_tokens=48)
        assert out.token_ids == truth, drafter
        assert out.stats.accepted_hist.keys() - {0}, f"{drafter} never accepted a token: the test shows nothing"


@needs_onednn
def test_onednn_tree_scores_match_sequential_onednn_decoding():
    model = float_model()
    backend = HFBackend(model, "onednn")
    prompt = repetitive_prompt(VOCAB, seed=1)
    chain = [5, 9, 2]
    state = backend.prefill(prompt[:-1])
    tree_logits = backend.score_tree(state, prompt[-1], DraftTree.chain(chain))
    state = backend.prefill(prompt[:-1])
    sequential = torch.stack([backend.decode(state, token) for token in [prompt[-1], *chain]])
    torch.testing.assert_close(tree_logits, sequential, rtol=1e-4, atol=1e-4)


def test_the_cost_profile_key_names_a_non_aten_kernel():
    model = float_model()
    aten = HFBackend(model, "aten")
    assert "linear" not in cost_key(aten) and cost_key(aten)["revision"] == 2
    if onednn_available():
        onednn = HFBackend(model, "onednn")
        assert cost_key(onednn)["linear"] == "onednn" and cost_key(onednn)["sha"] != cost_key(aten)["sha"]


def test_a_large_model_times_its_first_layers_and_its_lm_head(monkeypatch):
    linears = [torch.nn.Linear(10, 10) for _ in range(6)] + [torch.nn.Linear(10, 1000)]
    assert cpu_linear.timed_layers(linears) == linears  # 10,600 weights: all of them
    monkeypatch.setattr(cpu_linear, "AUTO_TIMED_PARAMS", 250)
    assert cpu_linear.timed_layers(linears) == linears[:3] + linears[-1:]


@needs_onednn
def test_a_layer_with_its_own_forward_is_left_alone():
    model = float_model()
    hooked = model.lm_head
    own = hooked.forward
    hooked.forward = lambda x: own(x)  # as accelerate's hooks do
    kernel = LinearKernel(model, "onednn")
    assert hooked not in kernel.linears and len(kernel.linears) == 14
    with kernel.active():
        pass
    assert "forward" in hooked.__dict__


@needs_onednn
def test_a_prompts_many_rows_stay_on_aten():
    layer = torch.nn.Linear(16, 8)
    kernel = LinearKernel(torch.nn.Sequential(layer), "onednn")
    many = torch.randn(1, cpu_linear.ONEDNN_MAX_ROWS + 1, 16)
    with torch.inference_mode(), kernel.active():
        assert torch.equal(layer(many), torch.nn.functional.linear(many, layer.weight, layer.bias))
