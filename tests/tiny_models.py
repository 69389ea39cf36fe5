"""Tiny random-init causal LMs built from configs (nothing is downloaded): float64, eval mode, seeded.

Every architecture gets a vocabulary of a few hundred tokens, 2 layers, hidden 64, grouped-query attention where
the architecture has it, and a context window of 256. EOS is unset (config and generation config), so a generation
runs to its length limit unless a test sets an EOS itself. With the default small `initializer_range` the random
models fall into loops of their own, which the n-gram drafter then partly predicts.

    model = tiny_model("llama")                  # cached per arguments: treat as read-only
    model = fresh_tiny_model("llama")            # uncached, for tests that change its config
    prompt = repetitive_prompt(model.config.vocab_size, seed=3)
    tokenizer = tiny_tokenizer()                 # a real fast tokenizer over the same 256 ids
    with single_thread(): ...                    # thousands of tiny forwards: no OpenMP hand-offs
"""

from __future__ import annotations

import contextlib
import functools
import random
import zlib

import torch
import transformers

VOCAB = 256
MAX_POSITIONS = 256


def _common(vocab: int, init_range: float) -> dict:
    return dict(vocab_size=vocab, bos_token_id=None, eos_token_id=None, pad_token_id=None,
                initializer_range=init_range, use_cache=True)


def _llama_like(config_cls, vocab: int, init_range: float, **extra):
    return config_cls(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=16, max_position_embeddings=MAX_POSITIONS,
                      tie_word_embeddings=False, **_common(vocab, init_range), **extra)


# arch name -> (config factory (vocab, init_range) -> config, model class name)
ARCHITECTURES = {
    "llama": (lambda v, r: _llama_like(transformers.LlamaConfig, v, r), "LlamaForCausalLM"),
    "qwen2": (lambda v, r: _llama_like(transformers.Qwen2Config, v, r, use_sliding_window=False),
              "Qwen2ForCausalLM"),
    "qwen3": (lambda v, r: _llama_like(transformers.Qwen3Config, v, r, use_sliding_window=False),
              "Qwen3ForCausalLM"),
    "mistral": (lambda v, r: _llama_like(transformers.MistralConfig, v, r, sliding_window=None),
                "MistralForCausalLM"),
    "gemma": (lambda v, r: _llama_like(transformers.GemmaConfig, v, r), "GemmaForCausalLM"),
    "phi3": (lambda v, r: transformers.Phi3Config(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=MAX_POSITIONS, original_max_position_embeddings=MAX_POSITIONS,
        sliding_window=None, **_common(v, r)), "Phi3ForCausalLM"),
    "gpt_neox": (lambda v, r: transformers.GPTNeoXConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=MAX_POSITIONS, rotary_pct=0.5, **_common(v, r)), "GPTNeoXForCausalLM"),
    "gpt2": (lambda v, r: transformers.GPT2Config(
        n_embd=64, n_layer=2, n_head=4, n_positions=MAX_POSITIONS, **_common(v, r)), "GPT2LMHeadModel"),
}


def fresh_tiny_model(arch: str, vocab: int = VOCAB, seed: int = 0, init_range: float = 0.02,
                     layers: int = 2) -> transformers.PreTrainedModel:
    """A new float64, eval-mode, random-init model of `arch` (a key of ARCHITECTURES). A larger `init_range` gives
    peakier next-token distributions (sampling tests); `layers` = 1 halves the cost of a forward."""
    config_factory, class_name = ARCHITECTURES[arch]
    config = config_factory(vocab, init_range)
    config.num_hidden_layers = layers  # every architecture here maps its own name (n_layer, ...) to this one
    torch.manual_seed(seed * 1000 + zlib.crc32(arch.encode()) % 1000)  # different weights per architecture
    model = getattr(transformers, class_name)(config).double().eval()
    generation_config = model.generation_config
    generation_config.eos_token_id = generation_config.bos_token_id = generation_config.pad_token_id = None
    return model


@functools.lru_cache(maxsize=None)
def _cached_tiny_model(arch: str, vocab: int, seed: int, init_range: float, layers: int) -> transformers.PreTrainedModel:
    return fresh_tiny_model(arch, vocab, seed, init_range, layers)


def tiny_model(arch: str, vocab: int = VOCAB, seed: int = 0, init_range: float = 0.02,
               layers: int = 2) -> transformers.PreTrainedModel:
    """`fresh_tiny_model`, cached per arguments: shared between tests, so never change it (cast a
    `fresh_tiny_model` instead). A cached model some earlier test cast in place fails here, naming the cause."""
    model = _cached_tiny_model(arch, vocab, seed, init_range, layers)
    dtype = next(model.parameters()).dtype
    assert dtype == torch.float64, f"the shared tiny_model({arch!r}) was cast to {dtype} in place by an earlier test"
    return model


def repetitive_prompt(vocab: int, seed: int = 0, length: int = 24, motif_len: int = 5) -> list[int]:
    """A random motif repeated with occasional one-token mutations: the n-gram drafter finds several earlier
    continuations of the prompt's suffix, some of which the model confirms and some it does not."""
    rng = random.Random(seed)
    motif = [rng.randrange(vocab) for _ in range(motif_len)]
    prompt: list[int] = []
    while len(prompt) < length:
        piece = list(motif)
        if rng.random() < 0.5:
            piece[rng.randrange(motif_len)] = rng.randrange(vocab)
        prompt += piece
    return prompt[:length]


ALPHABET = "abcdefghijklmnop"  # 16 letters -> 256 two-letter tokens


@functools.lru_cache(maxsize=None)
def tiny_tokenizer() -> transformers.PreTrainedTokenizerFast:
    """A real fast tokenizer over VOCAB ids: token i is the two letters ALPHABET[i // 16] + ALPHABET[i % 16].

    Text is split into two-letter pieces and decoded by plain concatenation, so decode(encode(s)) == s for any
    even-length string over ALPHABET, and a stop string can end in the middle of a token."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    vocab = {a + b: 16 * i + j for i, a in enumerate(ALPHABET) for j, b in enumerate(ALPHABET)}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="aa"))
    tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex(".."), behavior="isolated")
    tokenizer.decoder = decoders.Fuse()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizer)


def breadth_first(tree):
    """The same DraftTree with its nodes renumbered by depth (still topological): sibling subtrees interleave, so
    an accepted path is no longer a run of consecutive nodes."""
    from specdec.tree import DraftTree, depths

    node_depth = depths(tree).tolist()
    order = sorted(range(len(tree)), key=lambda node: node_depth[node])
    new_index = {old: new for new, old in enumerate(order)}
    parents = [-1 if tree.parents[old] < 0 else new_index[int(tree.parents[old])] for old in order]
    return DraftTree(tree.tokens[order], torch.tensor(parents, dtype=torch.long))


@contextlib.contextmanager
def single_thread():
    """Run torch on one thread inside the block. A forward of these models is ~1 ms of Python and 64-wide matrix
    products; a second OpenMP thread only adds synchronisation, which costs 10x when the CPU is shared."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def chi_square_p_value(counts: torch.Tensor, expected_probs: torch.Tensor) -> float:
    """Pearson chi-square goodness of fit; cells expected below 5 are pooled into one."""
    counts, expected = counts.flatten().double(), expected_probs.flatten() * counts.sum()
    small = expected < 5
    counts = torch.cat([counts[~small], counts[small].sum()[None]])
    expected = torch.cat([expected[~small], expected[small].sum()[None]])
    keep = expected > 0
    assert bool((counts[~keep] == 0).all()), "a sequence of probability 0 was generated"
    counts, expected = counts[keep], expected[keep]
    statistic = ((counts - expected) ** 2 / expected).sum()
    return float(torch.special.gammaincc(torch.tensor((counts.numel() - 1) / 2), statistic / 2))


def distorted(joint: torch.Tensor, mass: float = 0.05) -> torch.Tensor:
    """`joint` with `mass` moved from its most likely cell to the second most likely: what a distribution test
    must be able to reject (its power check)."""
    flat = joint.flatten().clone()
    best, second = flat.topk(2).indices.tolist()
    flat[best] -= mass
    flat[second] += mass
    return flat.reshape(joint.shape)


@functools.lru_cache(maxsize=None)
def greedy_truth(model, prompt: tuple[int, ...], length: int, eos: int | None = None) -> list[int]:
    """The reference decoder's greedy continuation of `prompt` (the oracle the drafter tests compare with); cached,
    so `prompt` is a tuple."""
    from specdec.backends.hf import HFBackend
    from specdec.reference import reference_decode
    from specdec.sampling import SamplingParams
    from specdec.stopping import StopRule

    rule = StopRule(length, eos_token_ids=frozenset() if eos is None else frozenset([eos]))
    return reference_decode(HFBackend(model), list(prompt), SamplingParams(), rule)


def greedy_tau_on_tiny(model, drafter: str, controller: str, seeds=(0, 1), length: int = 40) -> float:
    """Generate `repetitive_prompt`s of these seeds with `drafter`; every output must equal the reference decoder's
    and no drafter error may occur. Returns tau, which must exceed 1 (else acceptance was never exercised)."""
    from specdec import SpeculativeGenerator

    generator = SpeculativeGenerator(model, drafter=drafter, controller=controller)
    forwards = new_tokens = 0
    for seed in seeds:
        prompt = repetitive_prompt(VOCAB, seed=seed)
        out = generator.generate(prompt, max_new_tokens=length)
        assert out.token_ids == greedy_truth(model, tuple(prompt), length)
        assert out.stats.drafter_errors == 0
        forwards, new_tokens = forwards + out.stats.target_forwards, new_tokens + out.stats.new_tokens
    assert new_tokens / forwards > 1.0, "no draft was ever accepted: the test would not exercise acceptance"
    return new_tokens / forwards
