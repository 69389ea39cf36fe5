"""The `early_exit` drafter and its exit heads.

stories260K (5 layers, float64, token ids): a head at layer 3 trained here, in seconds, on the model's own greedy
stories; greedy output must equal the reference decoder, trained or not, and the trained head must raise tau.
Tiny random Llama / Qwen2 / Mistral: greedy equality. The drafter's cache must equal the target's own KV of its
first L layers over the committed tokens after every step. Plus the threshold, head files and the CLI.
"""

from __future__ import annotations

import argparse
import functools

import pytest
import torch

from specdec import SpeculativeGenerator
from specdec.backends.hf import HFBackend
from specdec.controllers import Budget
from specdec.drafters import DraftContext, TargetView, make_drafter
from specdec.drafters.early_exit import EarlyExitDrafter
from specdec.reference import reference_decode
from specdec.sampling import SamplingParams
from specdec.stopping import StopRule
from specdec.train.early_exit import (ExitHead, ExitHeadConfig, add_early_exit_parser, draft_logits,
                                      train_exit_head)
from tiny_models import ALPHABET, fresh_tiny_model, repetitive_prompt, single_thread, tiny_model, tiny_tokenizer

GREEDY = SamplingParams()
LAYER = 3
STATIC = "static:max_depth=6,max_nodes=6"


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    with single_thread():
        yield


def greedy(model, prompt, length):
    return reference_decode(HFBackend(model), list(prompt), GREEDY, StopRule(length))


@pytest.fixture(scope="module")
def stories_head(stories_model):
    """A layer-3 head trained on the model's greedy stories from three starts (BOS=1); ~3 s."""
    data = [[1, *start] + greedy(stories_model, [1, *start], 300) for start in ((), (400,), (300, 301))]
    return train_exit_head(stories_model, LAYER, data, steps=100, lr=1e-2, seq_len=128, batch_size=4)


def untrained(model, layer: int, kind: str = "linear") -> ExitHead:
    return ExitHead(ExitHeadConfig.for_target(model, layer, kind)).to(torch.float64)


def random_head(model, layer: int, kind: str = "mlp", seed: int = 0) -> ExitHead:
    """A non-identity head: exercises the head's path (an untrained one adds exactly 0)."""
    head, generator = untrained(model, layer, kind), torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for weight in head.parameters():
            weight.add_(torch.randn(weight.shape, generator=generator, dtype=weight.dtype) * 0.05)
    return head


def run(model, drafter, prompts, length, controller=STATIC, **options):
    """Generate every prompt; greedy outputs must equal the reference. Returns tau over all prompts."""
    generator = SpeculativeGenerator(model, drafter=drafter, controller=controller)
    new = forwards = 0
    for prompt in prompts:
        out = generator.generate(list(prompt), max_new_tokens=length, **options)
        assert out.stats.drafter_errors == 0
        if not options.get("temperature"):
            assert out.token_ids == greedy(model, prompt, length)
        new, forwards = new + out.stats.new_tokens, forwards + out.stats.target_forwards
    return new / forwards


# ------------------------------------------------------------------------------------------- greedy == reference


def test_stories_trained_head_is_exact_and_raises_tau(stories_model, stories_head, record_property):
    seen, held_out = [[1]], [[1, 29], [1, 450, 471]]  # held-out starts: not in the head's training data
    taus = {}
    for name, head in (("untrained", untrained(stories_model, LAYER)), ("trained", stories_head)):
        for threshold in (0.0, 0.6):
            drafter = EarlyExitDrafter(head, threshold=threshold)
            taus[name, threshold] = (run(stories_model, drafter, seen, 150), run(stories_model, drafter, held_out, 80))
    tree = run(stories_model, EarlyExitDrafter(stories_head, mode="tree", topk=3), held_out, 80,
               controller="static:max_depth=5,max_nodes=10")
    record_property("tau (seen, held-out) by (head, threshold)", taus)
    record_property("tau trained tree held-out", tree)
    print(taus, tree)
    for threshold in (0.0, 0.6):
        assert taus["trained", threshold][1] > 1.5, taus
        assert taus["trained", threshold][1] > taus["untrained", threshold][1] + 0.3, taus
    assert tree > 1.5


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3", "mistral"])
@pytest.mark.parametrize("mode", ["chain", "tree"])
def test_tiny_models_greedy_equals_reference(arch, mode):
    model = fresh_tiny_model(arch, vocab=128, layers=2, init_range=0.1)
    prompts = [repetitive_prompt(128, seed=seed) for seed in (0, 1)]
    drafter = EarlyExitDrafter(random_head(model, layer=1), threshold=0.0, mode=mode, topk=2)
    run(model, drafter, prompts, 30, controller="heuristic:start_depth=3,max_depth=6")


@pytest.mark.parametrize("mode", ["chain", "tree"])
def test_graphs_give_the_same_drafts_and_an_exact_cache(stories_model, stories_head, mode):
    """graphs=True: the first L layers' KV in a static cache of L layers, draft forwards as bucketed graph steps
    (eager off CUDA): the same tau as the DynamicCache path, the output equals the reference, and the cache's
    first rows equal the target's own KV of those layers after every step."""
    prompts, controller = [[1, 29], [1, 450, 471]], "static:max_depth=4,max_nodes=6"
    eager = run(stories_model, EarlyExitDrafter(stories_head, threshold=0.3, mode=mode, topk=2), prompts, 60,
                controller=controller)
    drafter = EarlyExitDrafter(stories_head, threshold=0.3, mode=mode, topk=2, graphs=True)
    assert run(stories_model, drafter, prompts, 60, controller=controller) == pytest.approx(eager)
    assert eager > 1.3 and drafter.kv.state.buffer.shape[0] == LAYER
    generator = SpeculativeGenerator(stories_model, drafter=drafter, controller=controller)
    for _ in generator.stream([1, 29], max_new_tokens=40):
        with torch.no_grad():
            full = stories_model(input_ids=torch.tensor([drafter.cached]), use_cache=True).past_key_values
        assert drafter.kv.length == len(drafter.cached)
        for index, layer in enumerate(full.layers[:LAYER]):
            keys, values = drafter.kv.layer(index)
            torch.testing.assert_close(keys, layer.keys, rtol=0, atol=1e-5)
            torch.testing.assert_close(values, layer.values, rtol=0, atol=1e-5)


# ------------------------------------------------------------------------------------------------- the cache


def test_cache_equals_target_kv_of_first_layers(stories_model, stories_head):
    """share_kv=False: the drafter's own cache of L layers equals the target's KV of those layers."""
    drafter = EarlyExitDrafter(stories_head, threshold=0.3, mode="tree", topk=2, share_kv=False)
    generator = SpeculativeGenerator(stories_model, drafter=drafter, controller="static:max_depth=4,max_nodes=6")
    steps = 0
    for _ in generator.stream([1, 29], max_new_tokens=60):
        ids = torch.tensor([drafter.cached])
        with torch.no_grad():
            out = stories_model(input_ids=ids, use_cache=True, output_hidden_states=True)
        assert len(drafter.kv.cache.layers) == LAYER
        assert drafter.kv.length == len(drafter.cached)
        for index, full in enumerate(out.past_key_values.layers[:LAYER]):
            keys, values = drafter.kv.layer(index)
            torch.testing.assert_close(keys, full.keys, rtol=0, atol=1e-10)
            torch.testing.assert_close(values, full.values, rtol=0, atol=1e-10)
        steps += 1
    assert steps > 5
    fresh = EarlyExitDrafter(stories_head)  # the draft pass = head over output_hidden_states[L]
    fresh._load(generator.target_view)
    with torch.no_grad():
        expected = draft_logits(stories_model, stories_head, out.hidden_states[LAYER])[0, -1]
    torch.testing.assert_close(fresh._catch_up(list(drafter.cached)), expected, rtol=0, atol=1e-10)


@pytest.mark.parametrize("backend", ["hf", "static"])
@pytest.mark.parametrize("mode", ["chain", "tree"])
def test_reading_the_target_kv_gives_the_same_drafts_without_a_cache_of_its_own(stories_model, stories_head,
                                                                                  backend, mode):
    """share_kv (default): the draft pass reads the target's own KV of layers < L and runs only the root and its
    frontier nodes: the same drafts (float64) as keeping a cache of its own, never a pass over the prompt, and no
    draft KV held between steps."""
    prompts, controller = [[1, 29], [1, 450, 471, 120, 310]], "static:max_depth=4,max_nodes=6"
    fed = {}

    def counting(drafter, name):
        run_layers = drafter.run_layers

        def counted(input_ids, *args, **kwargs):
            fed[name] = fed.get(name, 0) + input_ids.shape[1]
            return run_layers(input_ids, *args, **kwargs)
        drafter.run_layers = counted
        return drafter

    outputs = {}
    for share in (False, True):
        drafter = counting(EarlyExitDrafter(stories_head, threshold=0.3, mode=mode, topk=2, share_kv=share), share)
        generator = SpeculativeGenerator(stories_model, drafter=drafter, controller=controller, backend=backend)
        outputs[share] = []
        for prompt in prompts:
            out = generator.generate(prompt, max_new_tokens=50)
            assert out.token_ids == greedy(stories_model, prompt, 50) and out.stats.drafter_errors == 0
            outputs[share].append((out.stats.target_forwards, dict(out.stats.accepted_hist)))
        if share:
            assert drafter.kv is None and drafter.cached == []  # nothing of its own between steps
    assert outputs[True] == outputs[False] and outputs[True][0][0] < 50  # the same drafts, and they were accepted
    assert fed[True] < fed[False]  # the prompts and the accepted tokens never went through the draft's layers


# ----------------------------------------------------------------------------------------------- threshold


@pytest.mark.parametrize("threshold, expected_len", [(1.0, 1), (0.0, 5)])
def test_threshold(stories_model, stories_head, threshold, expected_len):
    view = TargetView(512, stories_model.device, stories_model)
    drafter = EarlyExitDrafter(stories_head, threshold=threshold)
    for prompt in ([1], [1, 29, 30, 31]):
        drafter.reset()
        tree = drafter.propose(DraftContext(prompt, Budget(max_nodes=8, max_depth=5), GREEDY, view))
        assert len(tree) == expected_len and tree.parents.tolist() == list(range(-1, expected_len - 1))
    generator = SpeculativeGenerator(stories_model, drafter=drafter, controller="static:max_depth=5,max_nodes=5")
    out = generator.generate([1], max_new_tokens=40)
    assert out.token_ids == greedy(stories_model, [1], 40)
    if threshold == 1.0:
        assert out.stats.drafted_nodes <= out.stats.target_forwards and set(out.stats.accepted_hist) <= {0, 1}


def test_sampling_completes(stories_model, stories_head):
    for mode in ("chain", "tree"):
        drafter = EarlyExitDrafter(stories_head, threshold=0.2, mode=mode, topk=2)
        out = SpeculativeGenerator(stories_model, drafter=drafter, controller=STATIC).generate(
            [1], max_new_tokens=60, temperature=0.8, seed=3)
        assert out.stats.drafter_errors == 0 and len(out.token_ids) == 60
        assert all(0 <= token < 512 for token in out.token_ids)


def test_unsupported_target_is_refused():
    model = tiny_model("gpt2", vocab=128)
    head = ExitHead(ExitHeadConfig(hidden_size=64, vocab_size=128, layer=1, num_layers=2, model_type="gpt2"))
    drafter = EarlyExitDrafter(head)
    with pytest.raises(ValueError, match="gpt2"):
        drafter.propose(DraftContext([1, 2], Budget(4, 4), GREEDY, TargetView(128, model.device, model)))


# ---------------------------------------------------------------------------------------------- head files


def test_head_round_trip_and_spec(tmp_path, stories_model, stories_head):
    path = tmp_path / "head.safetensors"
    stories_head.save(path)
    loaded = ExitHead.load(path, target=stories_model)
    assert loaded.config == stories_head.config
    for name, value in stories_head.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], value.cpu())
    drafter = make_drafter(f"early_exit:head={path},threshold=0.5")
    assert isinstance(drafter, EarlyExitDrafter) and drafter.threshold == 0.5 and drafter.layer == LAYER
    out = SpeculativeGenerator(stories_model, drafter=drafter, controller=STATIC).generate([1], max_new_tokens=30)
    assert out.token_ids == greedy(stories_model, [1], 30)


@functools.lru_cache(maxsize=None)
def _llama(vocab: int = 128, layers: int = 2):
    return fresh_tiny_model("llama", vocab=vocab, layers=layers)


@pytest.mark.parametrize("config, message", [
    (dict(hidden_size=32), "hidden size 32 != target hidden size 64"),
    (dict(vocab_size=256), "vocab 256 != target vocab 128"),
    (dict(layer=3, num_layers=5), "layer 3 needs more than 2 layers"),
])
def test_head_for_another_target_is_refused(tmp_path, config, message):
    shape = dict(hidden_size=64, vocab_size=128, layer=1, num_layers=2, model_type="llama")
    path = tmp_path / "head.safetensors"
    ExitHead(ExitHeadConfig(**{**shape, **config})).save(path)
    with pytest.raises(ValueError, match=message):
        ExitHead.load(path, target=_llama())
    ExitHead.load(path)  # without a target: no check


def test_corrupt_head_file(tmp_path):
    path = tmp_path / "head.safetensors"
    untrained(_llama(), 1).save(path)
    data = path.read_bytes()
    cases = {"truncated": data[: len(data) // 2], "garbage": b"\x00\x01 not a safetensors file",
             "no metadata": data.replace(b"specdec_exit_head", b"something_else___")}
    for name, content in cases.items():
        bad = tmp_path / f"{name.replace(' ', '_')}.safetensors"
        bad.write_bytes(content)
        with pytest.raises(ValueError, match="not a readable exit head"):
            ExitHead.load(bad)


# --------------------------------------------------------------------------------------------------------- CLI


def test_cli_writes_a_loadable_head(tmp_path):
    model_dir, data_dir, out = tmp_path / "model", tmp_path / "texts", tmp_path / "heads" / "head.safetensors"
    target = fresh_tiny_model("llama", vocab=256, layers=2)
    target.save_pretrained(model_dir)
    tiny_tokenizer().save_pretrained(model_dir)
    data_dir.mkdir()
    for index in range(3):
        (data_dir / f"{index}.txt").write_text((ALPHABET[index:] + ALPHABET[:index]) * 20)
    parser = argparse.ArgumentParser()
    add_early_exit_parser(parser.add_subparsers())
    args = parser.parse_args(["early-exit", "--target", str(model_dir), "--layer", "1", "--data", str(data_dir),
                              "--out", str(out), "--steps", "3", "--seq-len", "32", "--device", "cpu"])
    assert args.run(args) == 0
    head = ExitHead.load(out, target=target)
    assert head.config.layer == 1 and head.config.vocab_size == 256 and head.config.model_type == "llama"
    assert head.down.weight.abs().sum() > 0  # it trained


def test_native_draft_layers_match_hf_and_stay_exact():
    """graphs=True, native=True: the first L layers through specdec's native forward (the Triton interpreter here,
    CUDA graphs on a GPU), then the exit head, the final norm and LM head: the same logits as HF's layers and the
    head (float32 rounding), and the greedy output equals the reference."""
    from transformers import DynamicCache

    from specdec.backends.native import NativeBackend
    from specdec.drafters.early_exit import _EarlyLayers

    model = fresh_tiny_model("llama", vocab=128, layers=3, init_range=0.1).float()
    head = random_head(model, layer=2).float()
    prompts = [repetitive_prompt(128, seed=0)]
    drafter = EarlyExitDrafter(head, threshold=0.0, mode="tree", topk=2, graphs=True, native=True)
    run(model, drafter, prompts, 16, controller="static:max_depth=3,max_nodes=4")
    assert isinstance(drafter.kv.runner, NativeBackend) and drafter.kv.state.buffer.shape[0] == 2
    tokens = prompts[0][:20]
    backend = NativeBackend(_EarlyLayers(drafter), max_len=64)
    native = backend.prefill_chunks(backend.new_state(), tokens)
    with torch.no_grad():
        hf = drafter.run_layers(torch.tensor([tokens]), torch.arange(20)[None], None, DynamicCache())[0]
    torch.testing.assert_close(native[-1], hf[-1], atol=1e-4, rtol=1e-4)
