"""`retrieval`: REST-style drafting from a corpus datastore, or Lookahead-style from the context itself.

The context's longest suffix (max_query tokens down to min_query) is looked up; what followed its occurrences (at
most max_candidates of them) is counted into a trie, and the tree keeps the trie's most frequent nodes within the
budget. A node's count is the number of continuations through it, so parents always outrank their children.

Example: after "the cat", occurrences continue "sat on" x3, "sat by" x1, "ran" x2; counts: sat 4, ran 2, on 3,
by 1. With max_nodes=3 the tree is [sat, on, ran] (parents [-1, 0, -1]).

Where the occurrences come from (`mode`):
- "datastore" (the default with `datastore=PATH`): a file built offline (`specdec datastore build`).
- "context" (the default without one): the prompt and the generated tokens, indexed incrementally.
- "both": the candidates of the two counted into one trie (the context's first: they win ties).

Datastore file, format version 1 (little-endian):

    0    b"SPDCDS01"                 magic
    8    uint32 version, uint32 H    H = byte length of the JSON header
    16   H bytes of UTF-8 JSON       tokens_dtype, suffix_dtype, length (n), suffixes (m), sequences, vocab_size,
                                     tokenizer, tokenizer_hash, query_len (k), sha256 (of the payload)
    P    tokens (n,) int32           the corpus, documents separated by -1;  P = 16 + H rounded up to 64
         suffixes (m,) int32|int64   the positions p with tokens[p] >= 0, sorted by tokens[p:p+k]

Suffixes are sorted by their first k = query_len tokens only (a lexsort over packed shifted columns, seconds for
millions of tokens), so a datastore answers suffix queries of at most k tokens.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import struct
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np
import torch

from specdec.drafters.base import DraftContext, register_drafter
from specdec.tree import DraftTree

MAGIC, VERSION, ALIGN = b"SPDCDS01", 1, 64
_PREAMBLE = struct.Struct("<8sII")  # magic, version, JSON header length
SEPARATOR = -1  # between documents: no continuation crosses it


@register_drafter("retrieval")
class RetrievalDrafter:
    """datastore: a path (or a loaded `Datastore`); mode: "datastore" | "context" | "both" (see the module doc).
    max_query / min_query: suffix lengths tried (max_query None = the datastore's query_len, 8 in the context);
    max_candidates: occurrences read per query (evenly spaced over a datastore's matches, most recent in context);
    verify: check the datastore file's sha256 when loading it."""

    def __init__(self, datastore: str | os.PathLike | Datastore | None = None, mode: str | None = None,
                 max_query: int | None = None, min_query: int = 1, max_candidates: int = 64, verify: bool = True):
        mode = mode or ("context" if datastore is None else "datastore")
        if mode not in ("datastore", "context", "both"):
            raise ValueError(f"mode must be 'datastore', 'context' or 'both', got {mode!r}")
        if mode != "context" and datastore is None:
            raise ValueError(f"mode={mode} needs a datastore: pass datastore=PATH (see `specdec datastore build`)")
        if min_query < 1 or (max_query is not None and max_query < min_query) or max_candidates < 1:
            raise ValueError(f"need 1 <= min_query <= max_query and max_candidates >= 1, got min_query={min_query}, "
                             f"max_query={max_query}, max_candidates={max_candidates}")
        self.store = None
        if mode != "context":
            self.store = datastore if isinstance(datastore, Datastore) else load_datastore(datastore, verify)
        self.vocab_size = None if self.store is None else self.store.vocab_size
        self.mode, self.min_query, self.max_query, self.max_candidates = mode, min_query, max_query, max_candidates
        self.reset()

    def reset(self) -> None:
        self.context = None if self.mode == "datastore" else ContextIndex(self.min_query, self.max_query or 8)

    def observe(self, result) -> None:
        pass  # the context arrives with the next propose()

    def propose(self, ctx: DraftContext) -> DraftTree:
        if self.context is not None:
            self.context.extend(ctx.token_ids)
        candidates = []
        for index in filter(None, (self.context, self.store)):
            longest = min(self.max_query or index.query_len, index.query_len)
            candidates += continuations(index, ctx.token_ids, self.min_query, longest, self.max_candidates,
                                        ctx.budget.max_depth)
        return frequency_tree(candidates, ctx.budget.max_nodes, ctx.budget.min_confidence, source="retrieval")


def continuations(index, context: Sequence[int], min_query: int, max_query: int, limit: int,
                  max_depth: int) -> list[list[int]]:
    """What followed the longest suffix of `context` (max_query tokens down to min_query) that `index` holds with a
    non-empty continuation: up to `limit` continuations of at most `max_depth` tokens."""
    if max_depth < 1:
        return []
    shortest, longest = min_query, min(max_query, len(context))
    while shortest <= longest:  # bisect for the longest suffix that occurs (its own suffixes occur too)
        middle = (shortest + longest) // 2
        if index.occurrences(context[-middle:], 1):
            shortest = middle + 1
        else:
            longest = middle - 1
    for length in range(longest, min_query - 1, -1):  # down from there to one with a non-empty continuation
        found = [index.read(start, max_depth) for start in index.occurrences(context[-length:], limit)]
        found = [tokens for tokens in found if tokens]
        if found:
            return found
    return []


def frequency_tree(candidates: list[list[int]], max_nodes: int, min_confidence: float | None = None,
                   source: str | None = None) -> DraftTree:
    """The trie of `candidates` cut to its `max_nodes` most frequent nodes (ties: first seen first), each node's
    count / len(candidates) >= min_confidence. Counts never grow downwards, so the cut is a tree."""
    counts: dict[tuple[int, ...], int] = {}  # path from the root -> continuations through it, in first-seen order
    for tokens in candidates:
        for depth in range(1, len(tokens) + 1):
            path = tuple(tokens[:depth])
            counts[path] = counts.get(path, 0) + 1
    floor = (min_confidence or 0.0) * len(candidates)
    ranked = [path for path in sorted(counts, key=lambda path: -counts[path]) if counts[path] >= floor][:max_nodes]
    node_of = {path: node for node, path in enumerate(ranked)}
    parents = [node_of.get(path[:-1], -1) for path in ranked]
    names = None if source is None else (source,) * len(ranked)
    return DraftTree(tokens=_long([path[-1] for path in ranked]), parents=_long(parents), source=names)


def _long(values: list[int]) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.long)


class ContextIndex:
    """The context's n-grams (n = min_query..max_query) -> the positions right after them, grown incrementally."""

    def __init__(self, min_query: int, max_query: int):
        self.min_query, self.query_len = min_query, max_query
        self.tokens: list[int] = []
        self.after: dict[tuple[int, ...], list[int]] = defaultdict(list)

    def extend(self, token_ids: Sequence[int]) -> None:
        """Index the tokens committed since the last call (a different sequence is indexed afresh)."""
        known = len(self.tokens)
        if len(token_ids) < known or list(token_ids[:known]) != self.tokens:
            self.__init__(self.min_query, self.query_len)
            known = 0
        self.tokens.extend(token_ids[known:])
        for end in range(known + 1, len(self.tokens) + 1):
            for n in range(self.min_query, min(self.query_len, end) + 1):
                self.after[tuple(self.tokens[end - n:end])].append(end)

    def occurrences(self, query: Sequence[int], limit: int) -> list[int]:
        """Continuation starts of the `limit` most recent occurrences of `query`, the context's own suffix excluded."""
        ends = self.after.get(tuple(query), [])
        return [end for end in reversed(ends[-limit - 1:]) if end < len(self.tokens)][:limit]

    def read(self, start: int, length: int) -> list[int]:
        return self.tokens[start:start + length]


# ------------------------------------------------------------------------------------------------ the datastore

@dataclass(frozen=True, eq=False)
class Datastore:
    """A loaded datastore (arrays memory-mapped from `path`); `header` is the file's JSON header."""

    path: Path
    tokens: np.ndarray    # (n,) int32, -1 between documents
    suffixes: np.ndarray  # (m,) int32/int64, positions sorted by their first query_len tokens
    header: dict

    @property
    def vocab_size(self) -> int:
        return self.header["vocab_size"]

    @property
    def query_len(self) -> int:
        return self.header["query_len"]

    def occurrences(self, query: Sequence[int], limit: int) -> list[int]:
        """Continuation starts of up to `limit` occurrences of `query` (<= query_len tokens), evenly spaced over the
        suffix-array range, which is sorted by what follows: a sample proportional to continuation frequency."""
        query = [int(token) for token in query]
        lo, hi = self._bound(query, upper=False), self._bound(query, upper=True)
        rows = np.arange(lo, hi) if hi - lo <= limit else lo + (np.arange(limit) * (hi - lo)) // limit
        return (self.suffixes[rows].astype(np.int64) + len(query)).tolist()

    def read(self, start: int, length: int) -> list[int]:
        tokens = self.tokens[start:start + length]
        cut = np.flatnonzero(tokens < 0)
        return tokens[:cut[0] if len(cut) else len(tokens)].tolist()

    def _bound(self, query: list[int], upper: bool) -> int:
        """First suffix-array row whose first len(query) tokens are >= query (> query if `upper`). A suffix cut by
        the corpus end compares as if padded with -1, as the sort saw it."""
        lo, hi = 0, len(self.suffixes)
        while lo < hi:
            mid = (lo + hi) // 2
            start = int(self.suffixes[mid])
            key = self.tokens[start:start + len(query)].tolist()
            if key < query or (upper and key == query):
                lo = mid + 1
            else:
                hi = mid
        return lo


def build_datastore(token_id_sequences: Iterable[Sequence[int]], path: str | os.PathLike, vocab_size: int,
                    tokenizer_name: str = "", tokenizer_hash: str = "", query_len: int = 16) -> Path:
    """Write a datastore of the given documents (token ids in [0, vocab_size)) to `path` (atomically)."""
    if query_len < 1 or vocab_size < 1:
        raise ValueError(f"query_len and vocab_size must be >= 1, got {query_len} and {vocab_size}")
    documents = [np.asarray(sequence, dtype=np.int64).reshape(-1) for sequence in token_id_sequences]
    documents = [document for document in documents if len(document)]
    if not documents:
        raise ValueError("no tokens to index: every sequence is empty")
    tokens = np.concatenate([part for doc in documents for part in (doc, [SEPARATOR])])[:-1]
    bad = tokens[(tokens != SEPARATOR) & ((tokens < 0) | (tokens >= vocab_size))]
    if len(bad):
        raise ValueError(f"token id {int(bad[0])} is outside the vocabulary [0, {vocab_size})")
    tokens = tokens.astype("<i4")
    suffixes = suffix_array(tokens, query_len, vocab_size)
    suffixes = suffixes.astype("<i4" if len(tokens) < 2**31 else "<i8")
    digest = hashlib.sha256(tokens.data)
    digest.update(suffixes.data)
    header = dict(tokens_dtype="<i4", suffix_dtype=suffixes.dtype.str, length=len(tokens), suffixes=len(suffixes),
                  sequences=len(documents), vocab_size=int(vocab_size), tokenizer=tokenizer_name,
                  tokenizer_hash=tokenizer_hash, query_len=query_len, sha256=digest.hexdigest())
    blob = json.dumps(header).encode()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_name(f".{path.name}.building-{os.getpid()}")
    with open(staging, "wb") as file:
        file.write(_PREAMBLE.pack(MAGIC, VERSION, len(blob)) + blob)
        file.write(b"\0" * (_payload_offset(len(blob)) - file.tell()))
        file.write(tokens.data)
        file.write(suffixes.data)
    os.replace(staging, path)
    return path


def suffix_array(tokens: np.ndarray, query_len: int, vocab_size: int) -> np.ndarray:
    """Positions p with tokens[p] >= 0, sorted (stably) by tokens[p:p+query_len], -1 past the end. Tokens + 1 are
    packed into 64-bit words (e.g. 4 per word for a vocabulary < 65535), then numpy lexsorts the words."""
    bits = int(vocab_size).bit_length()
    per_word = 64 // bits
    padded = np.concatenate([tokens.astype(np.int64) + 1, np.zeros(query_len, np.int64)]).astype(np.uint64)
    positions = np.flatnonzero(tokens >= 0)
    words = []
    for first in range(0, query_len, per_word):
        word = np.zeros(len(positions), np.uint64)
        for shift in range(first, min(first + per_word, query_len)):
            word = (word << np.uint64(bits)) | padded[positions + shift]
        words.append(word)
    return positions[np.lexsort(words[::-1])]  # lexsort's last key is the primary one


def load_datastore(path: str | os.PathLike, verify: bool = True) -> Datastore:
    """Open a datastore file (memory-mapped); `verify` checks the payload's sha256 (reads the whole file once)."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as file:
        preamble = file.read(_PREAMBLE.size)
        if len(preamble) < _PREAMBLE.size:
            raise ValueError(f"{path}: truncated datastore ({size} bytes, shorter than its {_PREAMBLE.size}-byte "
                             f"preamble)")
        magic, version, header_len = _PREAMBLE.unpack(preamble)
        if magic != MAGIC:
            raise ValueError(f"{path}: not a specdec datastore (magic {magic!r}, expected {MAGIC!r})")
        if version != VERSION:
            raise ValueError(f"{path}: datastore format version {version}, this specdec reads version {VERSION}; "
                             f"rebuild it with `specdec datastore build`")
        try:
            header = json.loads(file.read(header_len).decode())
            offset = _payload_offset(header_len)
            token_bytes = header["length"] * np.dtype(header["tokens_dtype"]).itemsize
            expected = offset + token_bytes + header["suffixes"] * np.dtype(header["suffix_dtype"]).itemsize
        except (ValueError, KeyError, TypeError) as error:
            raise ValueError(f"{path}: corrupt datastore header ({error}); rebuild the datastore") from None
    if size != expected:
        raise ValueError(f"{path}: truncated or padded datastore: {size} bytes, the header says {expected}")
    if verify and _sha256(path, offset, expected) != header["sha256"]:
        raise ValueError(f"{path}: datastore checksum mismatch (the payload is corrupt); rebuild the datastore")
    tokens = np.memmap(path, dtype=header["tokens_dtype"], mode="r", offset=offset, shape=(header["length"],))
    suffixes = np.memmap(path, dtype=header["suffix_dtype"], mode="r", offset=offset + token_bytes,
                         shape=(header["suffixes"],))
    return Datastore(path, np.asarray(tokens), np.asarray(suffixes), header)


def _payload_offset(header_len: int) -> int:
    return -(-(_PREAMBLE.size + header_len) // ALIGN) * ALIGN


def _sha256(path: Path, start: int, end: int, chunk: int = 1 << 24) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        file.seek(start)
        while start < end:
            block = file.read(min(chunk, end - start))
            digest.update(block)
            start += len(block)
    return digest.hexdigest()


# --------------------------------------------------------------------------------------- from text, and the CLI

def tokenizer_fingerprint(tokenizer) -> str:
    """A short hash of the tokenizer's vocabulary (written to the header, to tell tokenizers apart)."""
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda item: item[1])
    return hashlib.sha256(json.dumps(vocab).encode()).hexdigest()[:16]


def build_from_texts(tokenizer, data: str | os.PathLike | Iterable[str], path: str | os.PathLike,
                     field: str = "text", split: str = "train", query_len: int = 16, vocab_size: int | None = None,
                     show_progress: bool = False) -> Path:
    """Tokenize texts (no special tokens) into a datastore. `data`: texts, a .jsonl file (its `field`), a directory
    (its **/*.txt) or a glob of text files, or a `datasets` name (its `split`, `field`). vocab_size defaults to
    len(tokenizer); pass the target's `config.vocab_size` when its embedding is padded beyond that."""
    from rich.console import Console
    from rich.progress import MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    texts = _texts(data, field, split)
    columns = [SpinnerColumn(), TextColumn("{task.description}"), MofNCompleteColumn(),
               TextColumn("{task.fields[tokens]:,} tokens"), TimeElapsedColumn()]
    with Progress(*columns, console=Console(stderr=True), disable=not show_progress) as progress:
        task = progress.add_task("tokenizing", total=None, tokens=0)
        documents, token_count = [], 0
        for batch in _batches(texts, 256):
            ids = [np.asarray(row, dtype=np.int32) for row in tokenizer(batch, add_special_tokens=False)["input_ids"]]
            documents += ids
            token_count += sum(map(len, ids))
            progress.update(task, advance=len(batch), tokens=token_count)
        progress.add_task("sorting suffixes, writing", total=None, tokens=token_count)
        return build_datastore(documents, path, vocab_size or len(tokenizer), getattr(tokenizer, "name_or_path", ""),
                               tokenizer_fingerprint(tokenizer), query_len)


def _texts(data, field: str, split: str) -> Iterator[str]:
    if not isinstance(data, (str, os.PathLike)):
        yield from data
        return
    text = str(data)
    if Path(text).is_dir() or glob.has_magic(text):
        files = sorted(Path(text).glob("**/*.txt")) if Path(text).is_dir() else sorted(map(Path, glob.glob(text,
                                                                                                recursive=True)))
        if not files:
            raise ValueError(f"no text files match {text}")
        yield from (file.read_text(encoding="utf-8", errors="replace") for file in files if file.is_file())
    elif text.endswith((".jsonl", ".json")):
        with open(text, encoding="utf-8") as lines:
            for number, line in enumerate(lines, 1):
                if line.strip():
                    record = json.loads(line)
                    if field not in record:
                        raise ValueError(f"{text}:{number}: no field {field!r} (fields: {', '.join(record)}); "
                                         f"pass --field")
                    yield record[field]
    else:
        import datasets

        yield from datasets.load_dataset(text, split=split)[field]


def _batches(items: Iterable[str], size: int) -> Iterator[list[str]]:
    batch: list[str] = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def datastore_command(args) -> int:
    """`specdec datastore build ...` writes a datastore; `specdec datastore info PATH` prints its header."""
    from rich.console import Console

    console = Console(stderr=True)
    if args.action == "info":
        store = load_datastore(args.path)
        console.print_json(data=store.header)
        return 0
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    path = build_from_texts(tokenizer, args.data, args.out, field=args.field, split=args.split,
                            query_len=args.query_len, vocab_size=args.vocab_size, show_progress=True)
    header = load_datastore(path, verify=False).header
    console.print(f"wrote {path}: {header['length']:,} tokens in {header['sequences']:,} documents, "
                  f"vocab {header['vocab_size']}, queries up to {header['query_len']} tokens")
    return 0


def add_datastore_parser(subparsers) -> None:
    parser = subparsers.add_parser("datastore", help="build or inspect retrieval datastores (drafter `retrieval`)")
    actions = parser.add_subparsers(dest="action", required=True)
    build = actions.add_parser("build", help="tokenize a corpus into a datastore file")
    build.add_argument("--tokenizer", required=True, help="tokenizer name or path (AutoTokenizer)")
    build.add_argument("--data", required=True,
                       help="a .jsonl file (see --field), a directory (its **/*.txt), a glob, or a datasets name")
    build.add_argument("--out", required=True, type=Path, help="datastore file to write")
    build.add_argument("--field", default="text", help="text field of the jsonl records / dataset rows")
    build.add_argument("--split", default="train", help="datasets split")
    build.add_argument("--query-len", type=int, default=16, help="longest suffix query the datastore answers")
    build.add_argument("--vocab-size", type=int, default=None,
                       help="the target's vocab size (config.vocab_size) when it exceeds len(tokenizer)")
    info = actions.add_parser("info", help="print a datastore's header")
    info.add_argument("path", type=Path)
    parser.set_defaults(run=datastore_command)
