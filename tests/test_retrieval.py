"""`retrieval`: the datastore file (round trip, header, corruption), suffix-array queries against a brute-force scan,
frequency-ranked trees, building from text and the CLI, the in-context index, and greedy output == the reference
decoder (tiny Llama / Qwen2, the real stories260K) in datastore, context and merged modes."""

from __future__ import annotations

import argparse
import json
import random
import struct

import numpy as np
import pytest
import torch
import transformers

from specdec import SpeculativeGenerator
from specdec.backends.hf import HFBackend
from specdec.controllers import Budget
from specdec.drafters.base import DraftContext, TargetView
from specdec.drafters.retrieval import (MAGIC, ContextIndex, RetrievalDrafter, add_datastore_parser, build_datastore,
                                        build_from_texts, continuations, frequency_tree, load_datastore,
                                        tokenizer_fingerprint)
from specdec.reference import reference_decode
from specdec.sampling import SamplingParams
from specdec.stopping import StopRule
from tiny_models import VOCAB, repetitive_prompt, tiny_model

GREEDY = SamplingParams()



def context(token_ids, max_nodes=16, max_depth=6, min_confidence=None):
    return DraftContext(list(token_ids), Budget(max_nodes, max_depth, min_confidence), GREEDY,
                        TargetView(VOCAB, torch.device("cpu")))


def tree_tuple(tree):
    return tree.tokens.tolist(), tree.parents.tolist()


def random_corpus(rng: random.Random, alphabet, documents=12, max_len=40):
    return [[rng.choice(alphabet) for _ in range(rng.randrange(0, max_len))] for _ in range(documents)]


# ------------------------------------------------------------------------------- queries vs a brute-force scan

def brute_starts(documents, query):
    """Continuation starts (offsets into the -1-joined corpus) of every occurrence of `query` inside a document."""
    starts, offset = [], 0
    for document in documents:
        for p in range(len(document) - len(query) + 1):
            if document[p:p + len(query)] == list(query):
                starts.append(offset + p + len(query))
        offset += len(document) + 1
    return sorted(starts)


@pytest.mark.parametrize("vocab, alphabet, query_len", [(5, range(5), 4),
                                                         (70000, [0, 1, 2, 69997, 69998, 69999], 7)])
def test_queries_match_brute_force(tmp_path, vocab, alphabet, query_len):
    """Small alphabets repeat a lot; vocab 70000 packs 3 tokens per sort word, so query_len 7 takes 3 words."""
    rng = random.Random(vocab)
    for trial in range(15):
        documents = random_corpus(rng, list(alphabet))
        if not any(documents):
            continue
        store = load_datastore(build_datastore(documents, tmp_path / f"{trial}.ds", vocab, query_len=query_len))
        kept = [d for d in documents if d]
        for _ in range(20):
            query = [rng.choice(list(alphabet)) for _ in range(rng.randrange(1, query_len + 1))]
            expected = brute_starts(kept, query)
            assert sorted(store.occurrences(query, limit=10**6)) == expected
            sample = store.occurrences(query, limit=3)
            assert len(sample) == min(3, len(expected)) and set(sample) <= set(expected)
            assert sample == store.occurrences(query, limit=3)  # deterministic


def test_continuations_take_the_longest_suffix_with_a_continuation(tmp_path):
    rng = random.Random(1)
    documents = random_corpus(rng, list(range(4)), documents=20)
    store = load_datastore(build_datastore(documents, tmp_path / "c.ds", 4, query_len=5))
    kept = [d for d in documents if d]
    joined = [t for d in kept for t in d + [-1]]
    for _ in range(100):
        ctx = [rng.randrange(4) for _ in range(rng.randrange(1, 9))]
        expected = []
        for length in range(min(5, len(ctx)), 0, -1):
            found = [joined[s:s + 3] for s in brute_starts(kept, ctx[-length:])]
            found = [c[:c.index(-1)] if -1 in c else c for c in found]
            if any(found):
                expected = sorted(c for c in found if c)
                break
        assert sorted(continuations(store, ctx, 1, 5, 10**6, 3)) == expected


# ------------------------------------------------------------------------------------------- frequency trees

HAND_MADE = [[7, 1, 2, 3]] * 3 + [[7, 1, 2, 4]] * 2 + [[7, 5], [0, 7, 6, 6]]


def test_tree_ranks_nodes_by_frequency(tmp_path):
    """After 7: "1 2 3" x3, "1 2 4" x2, "5", "6 6": counts 1:5, 2:5, 3:3, 4:2, then 5, 6, 6 once each."""
    drafter = RetrievalDrafter(datastore=build_datastore(HAND_MADE, tmp_path / "h.ds", 10, query_len=4))
    assert tree_tuple(drafter.propose(context([8, 7], max_nodes=4))) == ([1, 2, 3, 4], [-1, 0, 1, 1])
    assert tree_tuple(drafter.propose(context([8, 7], max_nodes=9))) == ([1, 2, 3, 4, 5, 6, 6],
                                                                           [-1, 0, 1, 1, -1, -1, 5])
    assert tree_tuple(drafter.propose(context([8, 7], max_nodes=9, max_depth=1))) == ([1, 5, 6], [-1, -1, -1])
    assert tree_tuple(drafter.propose(context([8, 7], min_confidence=0.4))) == ([1, 2, 3], [-1, 0, 1])
    assert tree_tuple(drafter.propose(context([3, 0, 7]))) == ([6, 6], [-1, 0])  # the longer match "0 7" wins
    assert drafter.propose(context([8, 7])).source == ("retrieval",) * 7
    assert len(drafter.propose(context([8, 9]))) == 0  # 9 never occurs
    assert len(drafter.propose(context([8, 7], max_nodes=0))) == 0


def test_frequency_tree_ties_keep_first_seen_order():
    tree = frequency_tree([[4, 5], [2], [4, 6], [2]], max_nodes=10)
    assert tree_tuple(tree) == ([4, 2, 5, 6], [-1, -1, 0, 0])


# ---------------------------------------------------------------------------------------------- the file format

def test_round_trip_header_and_trees(tmp_path):
    rng = random.Random(5)
    documents = random_corpus(rng, list(range(30)), documents=30, max_len=60)
    path = build_datastore(documents, tmp_path / "a.ds", 30, tokenizer_name="toy", tokenizer_hash="abc",
                           query_len=6)
    raw = path.read_bytes()
    assert raw[:8] == MAGIC and struct.unpack("<I", raw[8:12])[0] == 1
    store = load_datastore(path)
    kept = [d for d in documents if d]
    assert store.header | {"sha256": None} == dict(
        tokens_dtype="<i4", suffix_dtype="<i4", length=sum(len(d) + 1 for d in kept) - 1,
        suffixes=sum(map(len, kept)), sequences=len(kept), vocab_size=30, tokenizer="toy", tokenizer_hash="abc",
        query_len=6, sha256=None)
    assert store.tokens.tolist() == [t for d in kept for t in d + [-1]][:-1]
    assert build_datastore(documents, tmp_path / "b.ds", 30, "toy", "abc", 6).read_bytes() == raw  # deterministic
    by_path, by_object = RetrievalDrafter(datastore=path), RetrievalDrafter(datastore=store)
    assert by_path.vocab_size == 30 and by_path.store.query_len == 6
    for _ in range(30):
        ctx = context(rng.choice(kept)[:rng.randrange(1, 20)] or [0])
        tree = by_path.propose(ctx)
        assert tree_tuple(tree) == tree_tuple(by_object.propose(ctx))
        expected = frequency_tree(continuations(store, ctx.token_ids, 1, 6, 64, 6), 16)
        assert tree_tuple(tree) == tree_tuple(expected)


@pytest.fixture
def good_file(tmp_path):
    return build_datastore([[1, 2, 3, 1, 2, 4], [2, 3]], tmp_path / "good.ds", 8, query_len=3)


def rewrite(path, edit):
    data = bytearray(path.read_bytes())
    path.write_bytes(bytes(edit(data)))
    return path


def flip_last_byte(data):
    data[-1] ^= 0x01
    return data


CORRUPTIONS = {
    "truncated": (lambda data: data[:-3], "truncated or padded datastore"),
    "preamble": (lambda data: data[:10], "truncated datastore"),
    "magic": (lambda data: b"NOTADS01" + data[8:], "not a specdec datastore"),
    "version": (lambda data: data[:8] + struct.pack("<I", 2) + data[12:], "format version 2"),
    "header": (lambda data: data[:16] + b"x" + data[17:], "corrupt datastore header"),
    "payload": (flip_last_byte, "checksum mismatch"),
}


@pytest.mark.parametrize("kind", sorted(CORRUPTIONS))
def test_corrupt_files_raise_clear_errors(good_file, kind):
    edit, message = CORRUPTIONS[kind]
    path = rewrite(good_file, edit)
    with pytest.raises(ValueError, match=message) as error:
        load_datastore(path)
    assert str(path) in str(error.value)
    with pytest.raises(ValueError, match=message):
        RetrievalDrafter(datastore=path)


def test_unverified_load_skips_the_checksum(good_file):
    load_datastore(rewrite(good_file, flip_last_byte), verify=False)


def test_bad_input_is_rejected(tmp_path, good_file):
    with pytest.raises(ValueError, match="outside the vocabulary"):
        build_datastore([[1, 9]], tmp_path / "x.ds", 8)
    with pytest.raises(ValueError, match="every sequence is empty"):
        build_datastore([[], []], tmp_path / "x.ds", 8)
    with pytest.raises(ValueError, match="needs a datastore"):
        RetrievalDrafter(mode="both")
    with pytest.raises(ValueError, match="mode must be"):
        RetrievalDrafter(mode="web")
    with pytest.raises(ValueError, match="min_query"):
        RetrievalDrafter(min_query=3, max_query=2)
    with pytest.raises(ValueError, match="drafter vocab 8 != target vocab 256"):
        SpeculativeGenerator(tiny_model("llama"), drafter=RetrievalDrafter(datastore=good_file))


# ------------------------------------------------------------------------------------------ from text, the CLI

WORDS = ["[UNK]", "the", "cat", "sat", "on", "mat", "dog", "ran", "to", "a", "and", "."]
TEXTS = ["the cat sat on the mat .", "the dog ran to the cat .", "a cat and a dog sat on a mat ."]


@pytest.fixture(scope="module")
def word_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers

    tokenizer = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="[UNK]")


def ids(text):
    return [WORDS.index(word) for word in text.split()]


def test_build_from_texts_every_source(tmp_path, word_tokenizer, monkeypatch):
    expected = [t for text in TEXTS for t in ids(text) + [-1]][:-1]
    (tmp_path / "data.jsonl").write_text("".join(json.dumps({"body": t}) + "\n" for t in TEXTS))
    (tmp_path / "docs").mkdir()
    for i, text in enumerate(TEXTS):
        (tmp_path / "docs" / f"{i}.txt").write_text(text)
    (tmp_path / "docs" / "skip.bin").write_text("the the the")
    import datasets

    monkeypatch.setattr(datasets, "load_dataset", lambda name, split: datasets.Dataset.from_dict({"body": TEXTS}))
    sources = {"list": (TEXTS, "text"), "jsonl": (tmp_path / "data.jsonl", "body"), "dir": (tmp_path / "docs", ""),
               "glob": (str(tmp_path / "docs" / "*.txt"), ""), "datasets": ("some/dataset", "body")}
    for name, (data, field) in sources.items():
        store = load_datastore(build_from_texts(word_tokenizer, data, tmp_path / f"{name}.ds", field=field))
        assert store.tokens.tolist() == expected, name
        assert store.vocab_size == len(WORDS) and store.header["tokenizer_hash"] == tokenizer_fingerprint(
            word_tokenizer)
    tree = RetrievalDrafter(datastore=tmp_path / "list.ds").propose(context(ids("a dog"), max_depth=3))
    assert tree.tokens.tolist()[:3] == ids("sat on a")
    with pytest.raises(ValueError, match="no field 'text'"):
        build_from_texts(word_tokenizer, tmp_path / "data.jsonl", tmp_path / "x.ds")


def test_cli_build_and_info(tmp_path, word_tokenizer, capsys):
    word_tokenizer.save_pretrained(tmp_path / "tok")
    (tmp_path / "data.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    parser = argparse.ArgumentParser()
    add_datastore_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["datastore", "build", "--tokenizer", str(tmp_path / "tok"), "--data",
                              str(tmp_path / "data.jsonl"), "--out", str(tmp_path / "cli.ds"), "--query-len", "5",
                              "--vocab-size", "20"])
    assert args.run(args) == 0
    header = load_datastore(tmp_path / "cli.ds").header
    assert (header["query_len"], header["vocab_size"], header["sequences"]) == (5, 20, 3)
    args = parser.parse_args(["datastore", "info", str(tmp_path / "cli.ds")])
    assert args.run(args) == 0
    assert '"query_len": 5' in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------- context mode

def test_context_index_is_incremental():
    rng = random.Random(3)
    sequence = [rng.randrange(6) for _ in range(80)]
    grown, fresh = RetrievalDrafter(min_query=1, max_query=4), RetrievalDrafter(min_query=1, max_query=4)
    assert grown.vocab_size is None and grown.mode == "context"
    for end in range(1, 80, 3):
        fresh.reset()
        assert tree_tuple(grown.propose(context(sequence[:end]))) == tree_tuple(fresh.propose(context(sequence[:end])))
    other = [5, 4, 3, 5, 4]
    fresh.reset()
    assert tree_tuple(grown.propose(context(other))) == tree_tuple(fresh.propose(context(other))) == ([3, 5, 4],
                                                                                                    [-1, 0, 1])


def test_context_index_excludes_the_suffix_itself():
    index = ContextIndex(1, 3)
    index.extend([1, 2, 1, 2])
    assert index.occurrences([1, 2], 5) == [2]
    assert index.occurrences([2], 1) == [2]


# ------------------------------------------------------------------------------------- greedy == the reference

def greedy(model, prompt, length, eos=None):
    rule = StopRule(length, eos_token_ids=frozenset([eos]) if eos is not None else frozenset())
    return reference_decode(HFBackend(model), list(prompt), GREEDY, rule)


def check_greedy(model, drafter, prompts, truths, length, controller="static:max_depth=6,max_nodes=16"):
    """Asserts the outputs equal `truths`; returns tau (tokens per target forward) per prompt."""
    generator = SpeculativeGenerator(model, drafter=drafter, controller=controller)
    taus = []
    for prompt, truth in zip(prompts, truths):
        out = generator.generate(prompt, max_new_tokens=length)
        assert out.token_ids == truth and out.stats.drafter_errors == 0
        taus.append(out.stats.tau)
    return taus


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_tiny_greedy_equals_reference(tmp_path, arch):
    """The datastore holds the model's own greedy continuations of prompts 0-2; prompt 3 is new to it."""
    model = tiny_model(arch)
    prompts = [repetitive_prompt(VOCAB, seed=seed) for seed in range(4)]
    truths = [greedy(model, prompt, 40) for prompt in prompts]
    path = build_datastore([p + t for p, t in zip(prompts[:3], truths[:3])], tmp_path / "own.ds", VOCAB)
    taus = {mode: check_greedy(model, RetrievalDrafter(datastore=path, mode=mode), prompts, truths, 40)
            for mode in ("datastore", "both")}
    taus["context"] = check_greedy(model, "retrieval:max_query=4", prompts, truths, 40)
    assert min(taus["datastore"][:3] + taus["both"][:3]) > 5 and np.mean(taus["context"]) > 1.2, taus


def test_stories_greedy_equals_reference(tmp_path, stories_model):
    """The datastore holds stories260K's own greedy story from BOS; the second prompt starts mid-story, so its
    greedy continuation leaves the stored text."""
    story = greedy(stories_model, [1], 90, eos=2)
    prompts = [[1] + story[:15], [1] + story[45:60]]
    truths = [greedy(stories_model, prompt, 60, eos=2) for prompt in prompts]
    path = build_datastore([[1] + story], tmp_path / "stories.ds", 512)
    for mode, drafter in {"datastore": RetrievalDrafter(datastore=path), "context": "retrieval",
                          "both": RetrievalDrafter(datastore=path, mode="both", max_candidates=8)}.items():
        taus = check_greedy(stories_model, drafter, prompts, truths, 60, controller="heuristic")
        assert taus[0] > (4.0 if mode != "context" else 1.0) and np.mean(taus) > 1.1, (mode, taus)
