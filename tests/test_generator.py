"""SpeculativeGenerator end to end: greedy output == the reference decoder token for token (every tiny architecture,
the real stories260K), forced partial acceptance with scripted drafters, stopping rules, prompts of every kind, bad
input, failing drafters, statistics."""

from __future__ import annotations

import functools
import random
import warnings

import pytest
import torch

from specdec import SpeculativeGenerator
from specdec.backends.hf import HFBackend
from specdec.controllers import Budget, StepStats
from specdec.drafters import register_drafter
from specdec.drafters.ngram import NgramDrafter
from specdec.reference import reference_decode
from specdec.sampling import SamplingParams, target_probs
from specdec.stopping import StopRule
from specdec.tree import DraftTree, depths
from tiny_models import (ARCHITECTURES, MAX_POSITIONS, VOCAB, breadth_first, fresh_tiny_model, repetitive_prompt,
                         single_thread, tiny_model, tiny_tokenizer)

GREEDY = SamplingParams()


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    with single_thread():
        yield


@functools.lru_cache(maxsize=None)
def greedy_truth(arch: str, prompt: tuple[int, ...], length: int) -> list[int]:
    """The reference decoder's greedy continuation of `prompt` on the cached tiny model (no EOS)."""
    return reference_decode(HFBackend(tiny_model(arch)), list(prompt), GREEDY, StopRule(length))


def wrong(token: int, shift: int = 1, vocab: int = VOCAB) -> int:
    """A token that is not `token` (different shifts give different wrong tokens)."""
    return (token + shift) % vocab


def common_prefix(a, b) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def has_branching(tree: DraftTree) -> bool:
    parents = tree.parents.tolist()
    return len(set(parents)) < len(parents)


class Recording:
    """Wraps a drafter and keeps every tree it proposed, every budget it saw and every VerifyResult."""

    def __init__(self, inner):
        self.inner, self.vocab_size = inner, getattr(inner, "vocab_size", None)
        self.trees, self.budgets, self.results = [], [], []

    def propose(self, ctx):
        self.budgets.append(ctx.budget)
        tree = self.inner.propose(ctx)
        self.trees.append(tree)
        return tree

    def observe(self, result):
        self.results.append(result)
        self.inner.observe(result)

    def reset(self):
        self.inner.reset()


class OracleDrafter:
    """Knows the true continuation: proposes it as a chain as deep as the budget allows (everything accepted)."""

    vocab_size = None

    def __init__(self, prompt, truth):
        self.prompt, self.truth = list(prompt), list(truth)

    def propose(self, ctx):
        done = len(ctx.token_ids) - len(self.prompt)
        assert list(ctx.token_ids) == self.prompt + self.truth[:done], "committed tokens left the true path"
        return DraftTree.chain(self.truth[done: done + ctx.budget.max_depth])

    def observe(self, result):
        pass

    def reset(self):
        pass


def run(model, prompt, drafter="ngram", controller="heuristic", tokenizer=None, **options):
    return SpeculativeGenerator(model, tokenizer=tokenizer, drafter=drafter, controller=controller).generate(
        prompt, **options)


# ------------------------------------------------------------------------- greedy == reference, every architecture

DRAFTERS = {"chain": dict(max_matches=1), "tree": dict(max_n=3, max_matches=4)}  # NgramDrafter options
CONTROLLERS = {"static": "static:max_depth=6,max_nodes=16", "heuristic": "heuristic:start_depth=4,max_depth=10"}


@pytest.mark.parametrize("controller", sorted(CONTROLLERS))
@pytest.mark.parametrize("shape", sorted(DRAFTERS))
@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_greedy_equals_reference(arch, shape, controller):
    model = tiny_model(arch)
    drafter = Recording(NgramDrafter(**DRAFTERS[shape]))
    generator = SpeculativeGenerator(model, drafter=drafter, controller=CONTROLLERS[controller])
    accepted = 0
    for seed in range(2):
        prompt = repetitive_prompt(VOCAB, seed=seed)
        out = generator.generate(prompt, max_new_tokens=48)
        assert out.token_ids == greedy_truth(arch, tuple(prompt), 48)
        assert out.stats.stop_reason == "length" and out.stats.drafter_errors == 0
        accepted += sum(k * count for k, count in out.stats.accepted_hist.items())
    assert accepted > 0, "no draft token was ever accepted: the test would not exercise the tree path"
    branching = [has_branching(tree) for tree in drafter.trees]
    if shape == "chain":
        assert not any(branching)
    else:
        assert any(branching)


def test_ngram_trees_accept_later_branches():
    """Over a few architectures, ngram trees get accepted paths that start at a non-first root child, or that
    are not a run of consecutive nodes (the KV of those nodes had to be moved)."""
    later_branch = 0
    for arch in ("qwen3", "phi3", "qwen2"):
        drafter = Recording(NgramDrafter(max_n=1, max_matches=4))
        generator = SpeculativeGenerator(tiny_model(arch), drafter=drafter,
                                         controller="static:max_depth=6,max_nodes=24")
        for seed in range(6):
            prompt = repetitive_prompt(VOCAB, seed=seed)
            assert generator.generate(prompt, max_new_tokens=60).token_ids == greedy_truth(arch, tuple(prompt), 60)
        later_branch += sum(r.accepted_nodes != list(range(r.accepted_len)) for r in drafter.results)
    assert later_branch >= 5


def test_reference_equals_hf_generate():
    """The oracle itself: reference_decode's greedy output is HF generate's."""
    for arch in ("llama", "gpt2"):
        model = tiny_model(arch)
        prompt = repetitive_prompt(VOCAB, seed=3)
        hf = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                            do_sample=False, max_new_tokens=40, eos_token_id=None, pad_token_id=0)
        assert hf[0, len(prompt):].tolist() == greedy_truth(arch, tuple(prompt), 40)


# ------------------------------------------------------------------------------------------ the real stories260K

STORY_BOS, STORY_EOS = 1, 2


@pytest.fixture(scope="module")
def story(stories_model):
    """stories260K's own greedy story from BOS (it stops at EOS or 300 tokens)."""
    rule = StopRule(300, eos_token_ids=frozenset([STORY_EOS]))
    return reference_decode(HFBackend(stories_model), [STORY_BOS], GREEDY, rule)


def test_stories_reference_equals_hf_generate(stories_model, story):
    hf = stories_model.generate(torch.tensor([[STORY_BOS]]), do_sample=False, max_new_tokens=60)
    assert hf[0, 1:].tolist() == story[:60]


@pytest.mark.parametrize("drafter", ["ngram:max_matches=1", "ngram:max_n=4,max_matches=4"])
def test_stories_greedy_equals_reference(stories_model, story, drafter):
    backend = HFBackend(stories_model)
    generator = SpeculativeGenerator(stories_model, drafter=drafter, controller="heuristic")
    prompts = [[STORY_BOS], [STORY_BOS] + story[:25], [STORY_BOS] + story[:80], [STORY_BOS] + story[40:70]]
    forwards = new_tokens = 0
    for prompt in prompts:
        out = generator.generate(prompt, max_new_tokens=100)
        rule = StopRule(100, eos_token_ids=frozenset([STORY_EOS]))  # the model's generation_config has EOS 2
        assert out.token_ids == reference_decode(backend, prompt, GREEDY, rule)
        forwards += out.stats.target_forwards
        new_tokens += out.stats.new_tokens
    assert new_tokens / forwards > 1.2  # real text repeats itself: the n-gram drafts get accepted


# ------------------------------------------------------------------------------------ forced partial acceptance

DEPTH = 5  # deepest scripted draft


def chain_plan(corrupt_at: int):
    """The true continuation, DEPTH long, with a wrong token at depth `corrupt_at` (DEPTH = no wrong token)."""

    def paths(cont):
        if corrupt_at == DEPTH:
            return [cont[:DEPTH]]
        return [cont[:corrupt_at] + [wrong(cont[corrupt_at])] + cont[corrupt_at + 1: DEPTH]]

    return paths, corrupt_at


def tree_plan(level: int, rank: int, corrupt_at: int):
    """At depth `level` three siblings: the true branch (rank `rank` among them, wrong from depth `corrupt_at` on)
    and two wrong ones, each with a subtree that continues with the *true* later tokens (a verifier that ignored
    parents would accept them)."""

    def paths(cont):
        correct = cont[:corrupt_at] + ([wrong(cont[corrupt_at])] if corrupt_at < DEPTH else [])
        decoys = [cont[:level] + [wrong(cont[level], shift)] + cont[level + 1: level + 3] for shift in (1, 2)]
        return decoys[:rank] + [correct] + decoys[rank:]

    return paths, corrupt_at


PLANS = ([chain_plan(d) for d in range(DEPTH + 1)]
         + [tree_plan(level, rank, min(DEPTH, level + 1 + rank)) for level in range(3) for rank in range(3)])


class ScriptedDrafter:
    """Proposes, step after step, the trees of `plans` built around the true continuation; then empty trees.

    Each plan maps the true continuation to token paths; `breadth_first` interleaves sibling subtrees in every other
    tree. The accepted length greedy decoding must find is the longest common prefix of a path and the truth."""

    vocab_size = None

    def __init__(self, prompt, truth, plans):
        self.prompt, self.truth, self.plans = list(prompt), list(truth), list(plans)
        self.expected, self.results = [], []

    def propose(self, ctx):
        step = len(self.expected)
        if step == len(self.plans):
            return DraftTree.empty()
        done = len(ctx.token_ids) - len(self.prompt)
        assert list(ctx.token_ids) == self.prompt + self.truth[:done], "committed tokens left the true path"
        make_paths, designed = self.plans[step]
        cont = self.truth[done:]
        paths = make_paths(cont)
        expected = max(common_prefix(path, cont) for path in paths)
        assert expected == designed  # the script is what it says
        self.expected.append(expected)
        tree = DraftTree.from_paths(paths)
        return breadth_first(tree) if step % 2 else tree

    def observe(self, result):
        self.results.append(result)

    def reset(self):
        self.expected, self.results = [], []


def _forced_partial_acceptance(model, prompt, truth_of):
    need = sum(designed + 1 for _, designed in PLANS) + 2 * DEPTH
    truth = truth_of(need)
    drafter = ScriptedDrafter(prompt, truth, PLANS)
    out = run(model, prompt, drafter, "static:max_depth=8,max_nodes=64", max_new_tokens=need)
    assert out.stats.drafter_errors == 0
    assert out.token_ids == truth
    scripted = len(PLANS)
    assert [r.accepted_len for r in drafter.results[:scripted]] == drafter.expected
    assert drafter.expected == [designed for _, designed in PLANS]
    assert set(range(DEPTH + 1)) <= set(out.stats.accepted_hist)
    for result in drafter.results[:scripted]:  # the accepted tokens are the truth's, whichever branch they sit on
        assert result.accepted_tokens == [result.tree.tokens[node].item() for node in result.accepted_nodes]
    # the true branch was not the first sibling: accepted paths skip nodes
    assert sum(r.accepted_nodes != list(range(r.accepted_len)) for r in drafter.results[:scripted]) >= 6


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gpt_neox", "phi3"])
def test_forced_partial_acceptance(arch):
    prompt = repetitive_prompt(VOCAB, seed=6)
    _forced_partial_acceptance(tiny_model(arch), prompt, lambda n: greedy_truth(arch, tuple(prompt), n))


def test_forced_partial_acceptance_stories(stories_model, story):
    prompt = [STORY_BOS] + story[:30]
    backend = HFBackend(stories_model)
    assert STORY_EOS not in reference_decode(backend, prompt, GREEDY, StopRule(120))  # EOS would end it early
    _forced_partial_acceptance(stories_model, prompt,
                               lambda n: reference_decode(backend, prompt, GREEDY, StopRule(n)))


# ----------------------------------------------------------------------------------------------- sampling smoke


def test_sampling_same_seed_same_output():
    model = tiny_model("llama")
    prompt = repetitive_prompt(VOCAB, seed=1)
    options = dict(max_new_tokens=40, temperature=0.8, top_p=0.95, seed=123)
    generator = SpeculativeGenerator(model, drafter="ngram", controller="static:max_depth=5,max_nodes=10")
    first = generator.generate(prompt, **options)
    assert generator.generate(prompt, **options).token_ids == first.token_ids
    fresh = SpeculativeGenerator(model, drafter="ngram", controller="static:max_depth=5,max_nodes=10")
    assert fresh.generate(prompt, **options).token_ids == first.token_ids
    assert len(first.token_ids) == 40 and all(0 <= t < VOCAB for t in first.token_ids)
    others = {tuple(generator.generate(prompt, **{**options, "seed": seed}).token_ids) for seed in range(4)}
    assert len(others) > 1  # the seed matters


def test_sampling_with_heuristic_controller_is_reproducible():
    """Two fresh generators with the same seed produce the same sample."""
    model = tiny_model("gpt_neox")
    prompt = repetitive_prompt(VOCAB, seed=2)
    outs = [run(model, prompt, "ngram", "heuristic", max_new_tokens=40, temperature=1.0, seed=9).token_ids
            for _ in range(2)]
    assert outs[0] == outs[1]


def test_sampling_same_generator_same_seed_with_default_controller():
    generator = SpeculativeGenerator(tiny_model("gpt_neox"), drafter="ngram")  # controller "heuristic" by default
    prompt = repetitive_prompt(VOCAB, seed=2)
    outs = [generator.generate(prompt, max_new_tokens=40, temperature=1.0, seed=9).token_ids for _ in range(2)]
    assert outs[0] == outs[1]


@pytest.mark.parametrize("arch", ["qwen2", "gpt2"])
def test_sampled_tokens_respect_top_k(arch):
    """Every sampled token lies in the top-k of the target's logits at its position (and top-p's nucleus)."""
    model = tiny_model(arch)
    prompt = repetitive_prompt(VOCAB, seed=4)
    params = SamplingParams(temperature=1.5, top_k=3, top_p=0.9, seed=5)
    out = run(model, prompt, "ngram", "static:max_depth=4,max_nodes=8", max_new_tokens=40, temperature=1.5,
              top_k=3, top_p=0.9, seed=5)
    assert len(out.token_ids) == 40
    with torch.no_grad():
        logits = model(torch.tensor([prompt + out.token_ids])).logits[0, len(prompt) - 1: -1]
    probs = target_probs(logits, params)
    chosen = probs.gather(1, torch.tensor(out.token_ids)[:, None])[:, 0]
    assert bool((chosen > 0).all())
    assert bool(((probs > 0).sum(-1) <= 3).all())


# ---------------------------------------------------------------------------------------------------- stopping


def _first_occurrence_token(truth, lo, hi):
    """A token whose first occurrence in truth lies in [lo, hi), and that index."""
    for index in range(lo, hi):
        if truth[index] not in truth[:index]:
            return truth[index], index
    raise AssertionError("no token occurs for the first time in that range")


@pytest.mark.parametrize("drafter_kind", ["oracle", "ngram"])
def test_eos_stops_and_is_kept(drafter_kind):
    model = fresh_tiny_model("llama")
    prompt = repetitive_prompt(VOCAB, seed=7)
    truth = greedy_truth("llama", tuple(prompt), 60)
    eos, index = _first_occurrence_token(truth, 12, 40)
    model.generation_config.eos_token_id = eos
    drafter = Recording(OracleDrafter(prompt, truth) if drafter_kind == "oracle" else NgramDrafter())
    out = run(model, prompt, drafter, "static:max_depth=8,max_nodes=16", max_new_tokens=60)
    assert out.token_ids == truth[: index + 1] and out.token_ids[-1] == eos
    assert out.stats.stop_reason == "eos" and out.stats.new_tokens == index + 1
    rule = StopRule(60, eos_token_ids=frozenset([eos]))
    assert out.token_ids == reference_decode(HFBackend(model), prompt, GREEDY, rule)
    if drafter_kind == "oracle":  # the EOS came in the middle of a longer accepted path, which was cut
        committed = sum(len(r.committed_tokens) for r in drafter.results)
        assert committed > index + 1


def test_eos_list_in_generation_config():
    model = fresh_tiny_model("gpt2")
    prompt = repetitive_prompt(VOCAB, seed=8)
    truth = greedy_truth("gpt2", tuple(prompt), 40)
    eos_ids = [truth[25], truth[12]]
    model.generation_config.eos_token_id = eos_ids
    end = min(truth.index(eos) for eos in eos_ids) + 1
    out = run(model, prompt, OracleDrafter(prompt, truth), "static:max_depth=6", max_new_tokens=40)
    assert out.token_ids == truth[:end] and out.stats.stop_reason == "eos"


def test_eos_from_the_tokenizer():
    """No EOS in the model's configs: the tokenizer's eos_token ends the generation."""
    model = fresh_tiny_model("qwen2")
    model.config.eos_token_id = None
    prompt = repetitive_prompt(VOCAB, seed=8)
    truth = greedy_truth("qwen2", tuple(prompt), 40)
    eos, index = _first_occurrence_token(truth, 10, 40)
    tokenizer = tiny_tokenizer.__wrapped__()
    tokenizer.eos_token = tokenizer.convert_ids_to_tokens(eos)
    assert tokenizer.eos_token_id == eos
    out = run(model, prompt, "ngram", tokenizer=tokenizer, max_new_tokens=40)
    assert out.token_ids == truth[: index + 1] and out.stats.stop_reason == "eos"


@pytest.mark.parametrize("max_new_tokens", [1, 2, 3, 5, 8, 9, 10, 17])
def test_max_new_tokens_exact_with_long_accepted_drafts(max_new_tokens):
    prompt = repetitive_prompt(VOCAB, seed=9)
    truth = greedy_truth("phi3", tuple(prompt), 40)
    drafter = Recording(OracleDrafter(prompt, truth))
    out = run(tiny_model("phi3"), prompt, drafter, "static:max_depth=8,max_nodes=8", max_new_tokens=max_new_tokens)
    assert out.token_ids == truth[:max_new_tokens]
    assert out.stats.stop_reason == "length" and out.stats.new_tokens == max_new_tokens
    assert out.stats.target_forwards == -(-max_new_tokens // 9)  # every draft accepted: 9 tokens per forward
    assert all(budget.max_depth <= max_new_tokens - 1 for budget in drafter.budgets)  # never deeper than wanted
    ngram = run(tiny_model("phi3"), prompt, "ngram", "static:max_depth=8,max_nodes=8", max_new_tokens=max_new_tokens)
    assert ngram.token_ids == truth[:max_new_tokens]


def test_max_new_tokens_zero():
    model = tiny_model("llama")
    generator = SpeculativeGenerator(model, tokenizer=tiny_tokenizer(), drafter="ngram")
    out = generator.generate([3, 4, 5], max_new_tokens=0)
    assert out.token_ids == [] and out.text == "" and out.stats.target_forwards == 0
    assert out.stats.new_tokens == 0 and out.stats.stop_reason == "length"
    assert [chunk.token_ids for chunk in generator.stream([3, 4, 5], max_new_tokens=0)] == []


@pytest.mark.parametrize("arch", ["gpt2", "llama"])  # gpt2: learned absolute positions, position 256 would crash
@pytest.mark.parametrize("room", [1, 2, 5])
def test_context_window_stops(arch, room):
    model = tiny_model(arch)
    prompt = (repetitive_prompt(VOCAB, seed=10, length=40) * 7)[: MAX_POSITIONS - room]
    truth = reference_decode(HFBackend(model), prompt, GREEDY, StopRule(20, room=room))
    assert len(truth) == room
    for drafter in ("ngram", OracleDrafter(prompt, truth)):
        out = run(model, prompt, drafter, "static:max_depth=8,max_nodes=16", max_new_tokens=50)
        assert out.token_ids == truth and out.stats.stop_reason == "context" and out.stats.drafter_errors == 0
    out = run(model, prompt, "ngram", "heuristic", max_new_tokens=room)  # the length limit comes first or together
    assert out.token_ids == truth


def _stop_end(tokenizer, token_ids, stop):
    """The number of tokens up to the one that completes the first occurrence of any stop string (oracle)."""
    for end in range(1, len(token_ids) + 1):
        if any(s in tokenizer.decode(token_ids[:end]) for s in stop):
            return end
    return None


@pytest.mark.parametrize("drafter_kind", ["oracle", "ngram"])
def test_stop_strings(drafter_kind):
    tokenizer = tiny_tokenizer()
    prompt = repetitive_prompt(VOCAB, seed=11)
    truth = greedy_truth("gemma", tuple(prompt), 60)
    text = tokenizer.decode(truth)
    cases = [
        [text[31:34]],                 # ends in the middle of token 16 (two letters per token)
        [text[30:32]],                 # exactly token 15
        [text[41]],                    # one letter
        [text[51:55], text[25:28]],    # the earliest of two wins
        ["zz"],                        # never occurs ('z' is not in the alphabet)
    ]
    backend = HFBackend(tiny_model("gemma"))
    for stop in cases:
        drafter = OracleDrafter(prompt, truth) if drafter_kind == "oracle" else "ngram"
        out = run(tiny_model("gemma"), prompt, drafter, "static:max_depth=8,max_nodes=16", tokenizer=tokenizer,
                  max_new_tokens=60, stop=stop)
        end = _stop_end(tokenizer, truth, stop)
        if end is None:
            assert out.token_ids == truth and out.stats.stop_reason == "length"
            continue
        assert out.token_ids == truth[:end], stop
        assert out.stats.stop_reason == "stop_string"
        assert out.text == tokenizer.decode(truth[:end]) and any(s in out.text for s in stop)
        rule = StopRule(60, stop_strings=tuple(stop), tokenizer=tokenizer)
        assert out.token_ids == reference_decode(backend, prompt, GREEDY, rule)


# ------------------------------------------------------------------------------------------- prompts and stream


def _stream(generator, prompt, **options):
    """All chunks of stream() and its return value."""
    steps, chunks = generator.stream(prompt, **options), []
    while True:
        try:
            chunks.append(next(steps))
        except StopIteration as finished:
            return chunks, finished.value


def test_text_prompts_lists_and_tensors():
    tokenizer = tiny_tokenizer()
    generator = SpeculativeGenerator(tiny_model("qwen2"), tokenizer=tokenizer, drafter="ngram")
    texts = ["abcdefabcdefabcdefab", "pomnpomnpomnpo"]
    ids = [tokenizer(text).input_ids for text in texts]
    by_ids = [generator.generate(one, max_new_tokens=20) for one in ids]
    for text, one, expected in zip(texts, ids, by_ids):
        out = generator.generate(text, max_new_tokens=20)
        assert out.prompt_ids == one and out.token_ids == expected.token_ids
        assert isinstance(out.text, str) and out.text == tokenizer.decode(out.token_ids)
        assert out.token_ids == greedy_truth("qwen2", tuple(one), 20)
        assert generator.generate(torch.tensor(one), max_new_tokens=20).token_ids == expected.token_ids
    batch = generator.generate(texts, max_new_tokens=20)
    assert isinstance(batch, list) and [o.token_ids for o in batch] == [o.token_ids for o in by_ids]
    tensor_batch = generator.generate(torch.tensor([ids[0][:6], ids[1][:6]]), max_new_tokens=10)
    assert [o.token_ids for o in tensor_batch] == [greedy_truth("qwen2", tuple(one[:6]), 10) for one in ids]


@pytest.mark.parametrize("options", [dict(max_new_tokens=30), dict(max_new_tokens=30, stop=["ab"]),
                                     dict(max_new_tokens=25, temperature=0.9, seed=4)])
def test_stream_chunks_concatenate_to_generate(options):
    tokenizer = tiny_tokenizer()
    generator = SpeculativeGenerator(tiny_model("mistral"), tokenizer=tokenizer, drafter="ngram",
                                     controller="static:max_depth=5,max_nodes=10")
    prompt = "abcdabcdabcdabcdab"
    out = generator.generate(prompt, **options)
    chunks, returned = _stream(generator, prompt, **options)
    assert len(chunks) >= 2
    assert [t for chunk in chunks for t in chunk.token_ids] == out.token_ids == returned.token_ids
    assert "".join(chunk.text for chunk in chunks) == out.text == returned.text
    assert returned.stats.new_tokens == out.stats.new_tokens


def _byte_level_tokenizer():
    """GPT-2-style byte-level tokenizer over the 256 bytes (no merges): random ids make split and invalid UTF-8."""
    import transformers
    from tokenizers import Tokenizer, decoders, models

    # GPT-2's byte -> printable character map: printable bytes stand for themselves, the rest from U+0100 on
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    others = [byte for byte in range(256) if byte not in printable]
    chars = {**{byte: chr(byte) for byte in printable}, **{byte: chr(256 + i) for i, byte in enumerate(others)}}
    vocab = {char: byte for byte, char in chars.items()}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.decoder = decoders.ByteLevel()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizer)


def _metaspace_tokenizer():
    """SentencePiece-style pieces ("\u2581" = a space before the word; the decoder drops the text's first space)."""
    import transformers
    from tokenizers import Tokenizer, decoders, models

    pieces = ["\u2581" + a for a in "abcdefgh"] + list("abcdefgh") + ["\u2581"]
    tokenizer = Tokenizer(models.WordLevel({piece: i for i, piece in enumerate(pieces)}, unk_token="a"))
    tokenizer.decoder = decoders.Metaspace()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizer)


@pytest.mark.parametrize("make_tokenizer", [_byte_level_tokenizer, _metaspace_tokenizer, tiny_tokenizer])
def test_text_stream_deltas_add_up_to_the_whole_decode(make_tokenizer):
    """The windowed stream (it decodes only the last tokens) emits exactly the text of decoding everything."""
    from specdec.generator import _TextStream

    tokenizer = make_tokenizer()
    rng = random.Random(7)
    for trial in range(20):
        ids = [rng.randrange(len(tokenizer)) for _ in range(rng.randrange(1, 120))]
        stream, emitted, end = _TextStream(tokenizer), [], 0
        while end < len(ids):
            end = min(len(ids), end + rng.randrange(1, 6))
            emitted.append(stream.push(ids[:end] + [0] * trial, end))  # tokens past `end` are not read
        emitted.append(stream.push(ids, final=True))
        assert "".join(emitted) == tokenizer.decode(ids, skip_special_tokens=True)


def test_stream_without_tokenizer():
    generator = SpeculativeGenerator(tiny_model("llama"), drafter="ngram")
    prompt = repetitive_prompt(VOCAB, seed=12)
    chunks, returned = _stream(generator, prompt, max_new_tokens=30)
    assert [t for chunk in chunks for t in chunk.token_ids] == returned.token_ids
    assert returned.token_ids == greedy_truth("llama", tuple(prompt), 30)
    assert returned.text is None and all(chunk.text == "" for chunk in chunks)


# -------------------------------------------------------------------------------------------------- bad input


@pytest.fixture(scope="module")
def gen():
    return SpeculativeGenerator(tiny_model("llama"), tokenizer=tiny_tokenizer(), drafter="ngram")


@pytest.mark.parametrize("prompt,error,match", [
    ([], ValueError, "empty"),
    ("", ValueError, "empty"),
    ([1] * MAX_POSITIONS, ValueError, "context window"),
    ([1] * (MAX_POSITIONS + 10), ValueError, "context window"),
    ([3, -1, 4], ValueError, "vocabulary"),
    ([3, VOCAB, 4], ValueError, "vocabulary"),
    (torch.tensor([3, VOCAB + 7]), ValueError, "vocabulary"),
    (torch.tensor([1.0, 2.0]), TypeError, "integer"),
    ([1.5, 2], TypeError, "prompt"),
    (None, TypeError, "prompt"),
])
def test_bad_prompt(gen, prompt, error, match):
    with pytest.raises(error, match=match):
        gen.generate(prompt, max_new_tokens=5)


def test_chat_prompts():
    tokenizer = tiny_tokenizer.__wrapped__()
    generator = SpeculativeGenerator(tiny_model("llama"), tokenizer=tokenizer, drafter="ngram")
    with pytest.raises(ValueError, match="chat template"):
        generator.generate("abcd", chat=True, max_new_tokens=3)
    tokenizer.chat_template = "{% for message in messages %}op{{ message['content'] }}{% endfor %}"
    out = generator.generate("abcdabcd", chat=True, max_new_tokens=12)
    assert out.prompt_ids == tokenizer("opabcdabcd").input_ids
    assert out.token_ids == greedy_truth("llama", tuple(out.prompt_ids), 12)


def test_text_prompt_without_tokenizer():
    with pytest.raises(ValueError, match="tokenizer"):
        SpeculativeGenerator(tiny_model("llama"), drafter="ngram").generate("abcd", max_new_tokens=3)


@pytest.mark.parametrize("options,match", [
    (dict(max_new_tokens=-1), "max_new_tokens"),
    (dict(max_new_tokens=2.5), "max_new_tokens"),
    (dict(temperature=-0.1), "temperature"),
    (dict(temperature=float("nan")), "temperature"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.5), "top_p"),
    (dict(top_k=-1), "top_k"),
    (dict(top_k=2.5), "top_k"),
])
def test_bad_options(gen, options, match):
    with pytest.raises(ValueError, match=match):
        gen.generate([1, 2, 3], **{"max_new_tokens": 5, **options})
    with pytest.raises(ValueError, match=match):
        gen.stream([1, 2, 3], **{"max_new_tokens": 5, **options})


def test_drafter_vocab_mismatch():
    class OtherVocab(NgramDrafter):
        vocab_size = VOCAB + 44

    with pytest.raises(ValueError, match=rf"drafter vocab {VOCAB + 44} != target vocab {VOCAB}"):
        SpeculativeGenerator(tiny_model("llama"), drafter=OtherVocab())


def test_unknown_drafter_and_controller_names():
    with pytest.raises(ValueError, match="unknown drafter 'no_such_drafter'.*ngram"):
        SpeculativeGenerator(tiny_model("llama"), drafter="no_such_drafter")
    with pytest.raises(ValueError, match="unknown controller 'no_such_controller'.*heuristic.*static"):
        SpeculativeGenerator(tiny_model("llama"), controller="no_such_controller")
    with pytest.raises(ValueError, match="key=value"):
        SpeculativeGenerator(tiny_model("llama"), drafter="ngram:max_n")


@register_drafter("test_repeat_last")
class RepeatLastDrafter:
    """Registered by name in this test file: drafts `count` copies of the last token."""

    vocab_size = None

    def __init__(self, count: int = 2):
        self.count = count

    def propose(self, ctx):
        return DraftTree.chain([ctx.token_ids[-1]] * min(self.count, ctx.budget.max_depth))

    def observe(self, result):
        pass

    def reset(self):
        pass


def test_drafter_registered_by_name():
    prompt = repetitive_prompt(VOCAB, seed=13)
    out = run(tiny_model("qwen3"), prompt, "test_repeat_last:count=3", "static:max_depth=4", max_new_tokens=30)
    assert out.token_ids == greedy_truth("qwen3", tuple(prompt), 30)
    assert 0 < out.stats.drafted_nodes <= 3 * out.stats.target_forwards
    assert isinstance(SpeculativeGenerator(tiny_model("qwen3"), drafter="test_repeat_last").drafter, RepeatLastDrafter)


# ------------------------------------------------------------------------------------------ failing drafters


class FailingDrafter(NgramDrafter):
    """ngram, but the calls numbered in `fail_at` (1-based, per method) raise or return `garbage`."""

    def __init__(self, method="propose", fail_at=(3,), garbage=None):
        super().__init__(max_n=3, max_matches=3)
        self.method, self.fail_at, self.garbage, self.calls = method, set(fail_at), garbage, 0

    def _maybe_fail(self):
        self.calls += 1
        if self.calls in self.fail_at:
            if self.garbage is None:
                raise RuntimeError(f"drafter broke on call {self.calls}")
            return True
        return False

    def propose(self, ctx):
        if self.method == "propose" and self._maybe_fail():
            return self.garbage(ctx)
        return super().propose(ctx)

    def observe(self, result):
        if self.method == "observe":
            self._maybe_fail()


def _with_drafter(drafter, max_new_tokens=48, arch="gpt_neox", seed=14):
    prompt = repetitive_prompt(VOCAB, seed=seed)
    with pytest.warns(RuntimeWarning, match="drafter"):
        out = run(tiny_model(arch), prompt, drafter, "static:max_depth=5,max_nodes=10", max_new_tokens=max_new_tokens)
    assert out.token_ids == greedy_truth(arch, tuple(prompt), max_new_tokens)
    return out


def test_drafter_raising_mid_generation():
    out = _with_drafter(FailingDrafter(fail_at=(3,)))
    assert out.stats.drafter_errors == 1


def test_drafter_raising_repeatedly_warns_once():
    drafter = FailingDrafter(fail_at=range(2, 1000, 2))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = run(tiny_model("gpt_neox"), repetitive_prompt(VOCAB, seed=14), drafter,
                  "static:max_depth=5,max_nodes=10", max_new_tokens=48)
    assert out.token_ids == greedy_truth("gpt_neox", tuple(repetitive_prompt(VOCAB, seed=14)), 48)
    assert out.stats.drafter_errors == drafter.calls // 2 >= 2
    assert sum(issubclass(w.category, RuntimeWarning) for w in caught) == 1


def test_drafter_raising_in_observe():
    drafter = FailingDrafter(method="observe", fail_at=(1, 2, 5))
    out = _with_drafter(drafter)
    assert out.stats.drafter_errors == 3


GARBAGE = {
    "out_of_vocab": lambda ctx: DraftTree.chain([5, VOCAB + 3]),
    "negative": lambda ctx: DraftTree.chain([-4]),
    "not_a_tree": lambda ctx: [1, 2, 3],
    "tensor": lambda ctx: torch.tensor([1, 2]),
    "too_deep": lambda ctx: DraftTree.chain([1] * (ctx.budget.max_depth + 1)),
}


@pytest.mark.parametrize("kind", sorted(GARBAGE))
def test_drafter_returning_garbage(kind):
    out = _with_drafter(FailingDrafter(fail_at=(2, 4), garbage=GARBAGE[kind]))
    assert out.stats.drafter_errors == 2


def test_drafter_returning_draft_probs_of_wrong_vocab():
    bad_probs = lambda ctx: DraftTree.chain([5, 6], draft_probs=torch.full((2, VOCAB + 1), 1 / (VOCAB + 1)))
    out = _with_drafter(FailingDrafter(fail_at=(2,), garbage=bad_probs))
    assert out.stats.drafter_errors == 1


# ---------------------------------------------------------------------------------------------------- statistics


def test_stats_are_consistent():
    drafter = Recording(NgramDrafter(max_n=3, max_matches=3))
    prompt = repetitive_prompt(VOCAB, seed=15)
    out = run(tiny_model("gpt2"), prompt, drafter, "heuristic", max_new_tokens=50)
    stats = out.stats
    assert stats.new_tokens == len(out.token_ids) == 50
    assert stats.tau == pytest.approx(stats.new_tokens / stats.target_forwards) and stats.tau > 1
    assert sum(stats.accepted_hist.values()) == stats.target_forwards == len(drafter.results)
    assert stats.drafted_nodes == sum(len(tree) for tree in drafter.trees)
    assert {"prefill", "draft", "verify", "accept", "commit", "observe"} <= set(stats.seconds)
    assert all(seconds >= 0 for seconds in stats.seconds.values()) and stats.seconds["verify"] > 0
    assert stats.wall_s >= sum(stats.seconds.values()) * 0.99 and stats.tokens_per_s > 0
    as_dict = stats.as_dict()
    assert as_dict["tau"] == stats.tau and as_dict["stop_reason"] == "length"
    assert sum(as_dict["accepted_hist"].values()) == stats.target_forwards


class RecordingController:
    def __init__(self):
        self.steps = []

    def budget(self, history):
        return Budget(max_nodes=8, max_depth=4)

    def observe(self, step):
        self.steps.append(step)


def test_controller_sees_every_step():
    controller = RecordingController()
    drafter = Recording(NgramDrafter())
    generator = SpeculativeGenerator(tiny_model("llama"), drafter=drafter, controller=controller)
    out = generator.generate(repetitive_prompt(VOCAB, seed=16), max_new_tokens=30)
    assert len(controller.steps) == out.stats.target_forwards
    for step, tree, result in zip(controller.steps, drafter.trees, drafter.results):
        assert isinstance(step, StepStats)
        assert step.drafted_nodes == len(tree) and step.accepted_len == result.accepted_len
        assert step.draft_depth == (int(depths(tree).max()) if len(tree) else 0)


def test_controller_sees_phase_times():
    controller = RecordingController()
    SpeculativeGenerator(tiny_model("llama"), drafter="ngram", controller=controller).generate(
        repetitive_prompt(VOCAB, seed=16), max_new_tokens=20)
    assert all(step.verify_s > 0 and step.draft_s > 0 for step in controller.steps)
