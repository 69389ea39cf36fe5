"""specdec.train.distill: a 1-layer draft distilled from a tiny peaky target saved to disk like a real one.

The target is a random-init 2-layer Llama (vocab 256, float32, init range 0.02) with its LM head x16, so its
next-token distributions are peaky and mostly decided by the last few tokens: a 1-layer draft learns them in
seconds (a chaotic target, init range 0.1, is not learnt in a test's budget). The texts are random strings over
tiny_tokenizer's two-letter tokens.
"""

from __future__ import annotations

import dataclasses
import json
import random

import pytest
import torch
from specdec.train.distill import (
    LOSSES,
    METADATA_FILE,
    OPTIMIZER_FILE,
    PRESETS,
    DistillConfig,
    distill,
    distill_loss,
    forward_kl,
    main,
)
from tiny_models import ALPHABET, fresh_tiny_model, tiny_tokenizer
from transformers import AutoModelForCausalLM

from specdec import SpeculativeGenerator
from specdec.backends.hf import HFBackend
from specdec.reference import reference_decode
from specdec.sampling import SamplingParams
from specdec.stopping import StopRule

CONFIG = PRESETS["cpu-test"]  # 1 layer, hidden 64, 128 prompts x 24 new tokens, 60 steps of batch 16


@pytest.fixture(scope="module")
def target_dir(tmp_path_factory):
    model = fresh_tiny_model("llama").float()
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(16.0)
    path = tmp_path_factory.mktemp("target")
    model.save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def texts_dir(tmp_path_factory):
    path, rng = tmp_path_factory.mktemp("texts"), random.Random(0)
    for i in range(20):  # 18 training texts, 2 held out
        (path / f"text_{i:02d}.txt").write_text("".join(rng.choice(ALPHABET) for _ in range(200)))
    return path


@pytest.fixture(scope="module")
def trained(target_dir, texts_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "draft"
    return distill(CONFIG, target_dir, str(texts_dir), out, progress=False), out


def test_distillation_learns_the_target(trained):
    state, _ = trained
    assert state.complete and state.step == CONFIG.max_steps
    first, last = sum(state.losses[:5]) / 5, sum(state.losses[-5:]) / 5
    assert last < 0.7 * first, (first, last)
    assert state.after["held_out_loss"] < state.before["held_out_loss"]
    assert state.after["top1_agreement"] > state.before["top1_agreement"] + 0.1, (state.before, state.after)
    assert state.after["tau"] > state.before["tau"] + 0.1, (state.before, state.after)


def test_saved_draft_loads_and_decodes_losslessly(trained, target_dir):
    _, out = trained
    metadata = json.loads((out / METADATA_FILE).read_text())
    assert metadata["step"] == CONFIG.max_steps and metadata["after"] is not None
    assert metadata["config"] == dataclasses.asdict(CONFIG)
    draft = AutoModelForCausalLM.from_pretrained(out)
    assert draft.config.vocab_size == 256 and draft.config.num_hidden_layers == 1
    generator = SpeculativeGenerator(str(target_dir), drafter=f"model:path={out}", controller="static:max_depth=4",
                                     dtype=torch.float32, device="cpu")
    backend = HFBackend(generator.backend.model)
    accepted = 0
    for prompt in ("abcdefgh", "ponmlkjihgfe", "aaaabbbb"):
        output = generator.generate(prompt, max_new_tokens=24)
        ids = generator.encode(prompt)
        expected = reference_decode(backend, ids, SamplingParams(), StopRule(24, set(), (), None, None))
        assert output.token_ids == expected
        assert output.stats.drafter_errors == 0
        accepted += sum(k * n for k, n in output.stats.accepted_hist.items())
    assert accepted > 0  # the distilled draft really drafted what the target then verified


def test_forward_kl_is_zero_on_equal_logits():
    logits = torch.randn(2, 5, 256, generator=torch.Generator().manual_seed(0)) * 3
    assert torch.allclose(forward_kl(logits, logits.clone(), 1.0, 8), torch.zeros(2, 5), atol=1e-6)
    assert (forward_kl(logits + torch.randn_like(logits), logits, 1.0, 8) > 1e-3).all()
    for kind in LOSSES:
        loss = distill_loss(logits, logits.clone(), torch.ones(2, 5), dataclasses.replace(CONFIG, loss=kind))
        assert abs(float(loss)) < 1e-5, kind


@pytest.mark.parametrize("kind", sorted(LOSSES))
def test_each_loss_trains_one_step(kind, target_dir, texts_dir, tmp_path):
    config = dataclasses.replace(CONFIG, loss=kind, max_steps=1, num_prompts=8, eval_prompts=1, eval_new_tokens=4,
                                 gen_tokens=8, topk=4)
    state = distill(config, target_dir, str(texts_dir), tmp_path / "draft", progress=False)
    assert state.step == 1 and torch.isfinite(torch.tensor(state.losses)).all() and state.losses[0] > 0


def test_resume_after_interruption_equals_an_uninterrupted_run(target_dir, texts_dir, tmp_path):
    config = dataclasses.replace(CONFIG, max_steps=12, save_every=5, num_prompts=12, eval_prompts=1,
                                 eval_new_tokens=4)
    whole = distill(config, target_dir, str(texts_dir), tmp_path / "whole", progress=False)
    part = distill(config, target_dir, str(texts_dir), tmp_path / "split", stop_after=7, progress=False)
    assert part.step == 7 and not part.complete
    resumed = distill(config, target_dir, str(texts_dir), tmp_path / "split", resume=True, progress=False)
    assert resumed.step == 12 and resumed.complete
    assert resumed.losses == pytest.approx(whole.losses, rel=1e-5)
    a = AutoModelForCausalLM.from_pretrained(tmp_path / "whole").state_dict()
    b = AutoModelForCausalLM.from_pretrained(tmp_path / "split").state_dict()
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=1e-6)
    # the interruption mattered: a fresh draft differs from the result
    assert not torch.allclose(a["model.embed_tokens.weight"], _fresh_embedding(target_dir, config))


def _fresh_embedding(target_dir, config: DistillConfig) -> torch.Tensor:
    from specdec.train.distill import build_draft, load_target

    target, tokenizer = load_target(target_dir, torch.device("cpu"))
    return build_draft(target, tokenizer, config).get_input_embeddings().weight


def test_draft_with_another_vocab_is_refused(target_dir, texts_dir, tmp_path):
    other = fresh_tiny_model("llama", vocab=128, layers=1).float()
    other.save_pretrained(tmp_path / "other")
    config = dataclasses.replace(CONFIG, draft_path=str(tmp_path / "other"))
    with pytest.raises(ValueError, match="draft vocab 128 != target vocab 256"):
        distill(config, target_dir, str(texts_dir), tmp_path / "draft", progress=False)


@pytest.mark.parametrize("damaged", ["model.safetensors", OPTIMIZER_FILE, METADATA_FILE])
def test_corrupt_checkpoint_is_a_clear_error(damaged, target_dir, texts_dir, tmp_path):
    config = dataclasses.replace(CONFIG, max_steps=3, num_prompts=8, eval_prompts=1, eval_new_tokens=4)
    out = tmp_path / "draft"
    distill(config, target_dir, str(texts_dir), out, stop_after=2, progress=False)
    path = out / damaged
    path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 3])
    with pytest.raises(ValueError, match="checkpoint in .* is unreadable"):
        distill(config, target_dir, str(texts_dir), out, progress=False)


def test_cli_builds_a_draft_from_a_preset_and_resumes(target_dir, texts_dir, tmp_path):
    args = ["--target", str(target_dir), "--draft", "cpu-test", "--data", str(texts_dir), "--out",
            str(tmp_path / "d"), "--max-steps", "2", "--num-prompts", "8", "--eval-prompts", "1",
            "--eval-new-tokens", "4", "--loss", "jsd", "--quiet"]
    assert main(args + ["--stop-after", "1"]) == 0
    assert json.loads((tmp_path / "d" / METADATA_FILE).read_text())["step"] == 1
    assert main(args + ["--resume"]) == 0
    metadata = json.loads((tmp_path / "d" / METADATA_FILE).read_text())
    assert metadata["step"] == 2 and metadata["complete"] and metadata["config"]["loss"] == "jsd"
