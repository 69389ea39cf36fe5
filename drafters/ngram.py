"""`ngram`: prompt lookup decoding (PLD) that drafts a tree.

The context's last n tokens are looked up among its earlier n-grams (n from `max_n` down to `min_n`); what followed
each earlier occurrence is a candidate continuation. Candidates are ranked longest match first, then most recent
first, and merged into a trie, so a context holding several different continuations of the suffix gives a branching
tree within the node budget.

Example: context "a b c x ... a b c y ... a b c" with max_n=3 finds "x ..." and "y ..." after the two earlier
"a b c"; the tree gets two branches below the root: the recent "y ..." first, then "x ...".
"""

from __future__ import annotations

from collections import defaultdict

from specdec.drafters.base import DraftContext, match_length, register_drafter
from specdec.tree import DraftTree


@register_drafter("ngram")
class NgramDrafter:
    """max_n / min_n: the suffix lengths tried; max_matches: how many earlier occurrences become branches."""

    vocab_size = None  # copies token ids from the context: works with any vocabulary

    def __init__(self, max_n: int = 3, min_n: int = 1, max_matches: int = 4):
        if not 1 <= min_n <= max_n:
            raise ValueError(f"need 1 <= min_n <= max_n, got min_n={min_n}, max_n={max_n}")
        if max_matches < 1:
            raise ValueError(f"max_matches must be >= 1, got {max_matches}")
        self.max_n, self.min_n, self.max_matches = max_n, min_n, max_matches
        self.reset()

    def reset(self) -> None:
        self._tokens: list[int] = []
        # n-gram (as a tuple) -> start positions in self._tokens, in increasing order
        self._starts: dict[tuple[int, ...], list[int]] = defaultdict(list)

    def observe(self, result) -> None:
        pass  # the context itself is the whole state; it arrives with the next propose()

    def propose(self, ctx: DraftContext) -> DraftTree:
        self._index(ctx.token_ids)
        budget = ctx.budget
        continuations, matched = self._continuations(budget.max_depth)
        return DraftTree.from_paths(continuations, source="ngram", max_nodes=budget.max_nodes, match_len=matched)

    def _index(self, token_ids) -> None:
        """Add the n-grams ending at the tokens committed since the last call (a new sequence is re-indexed)."""
        known = len(self._tokens)
        if len(token_ids) < known or list(token_ids[:known]) != self._tokens:
            self.reset()
            known = 0
        self._tokens.extend(token_ids[known:])
        for end in range(known + 1, len(self._tokens) + 1):
            for n in range(self.min_n, min(self.max_n, end) + 1):
                self._starts[tuple(self._tokens[end - n:end])].append(end - n)

    def _continuations(self, max_depth: int) -> tuple[list[list[int]], int]:
        """Distinct continuations of the context's suffix, longest match then most recent first, and how far the
        first one's occurrence matches the context looking back (`match_length`, >= its n; 0: none found)."""
        tokens, found, seen, matched = self._tokens, [], set(), 0
        for n in range(min(self.max_n, len(tokens) - 1), self.min_n - 1, -1):
            suffix_start = len(tokens) - n
            for start in reversed(self._starts.get(tuple(tokens[suffix_start:]), ())):
                if start >= suffix_start:
                    continue  # the suffix itself
                continuation = tuple(tokens[start + n: start + n + max_depth])
                if continuation and continuation not in seen:
                    seen.add(continuation)
                    found.append(list(continuation))
                    matched = matched or match_length(tokens, start + n)
                if len(found) >= self.max_matches:
                    return found, matched
        return found, matched
