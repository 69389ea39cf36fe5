"""`copyspec`: CopySpec (Dumitru et al., 2025) — copy long spans that the conversation already contains.

The last γ (`gamma`) committed tokens are looked up in a hash of every γ-gram of the context: the earlier turns (a
chat's next turn arrives with them in its prompt) and the text generated so far. Each earlier occurrence proposes
the span that followed it, `copy_len` tokens long: the most recent occurrence first, up to `max_branches` distinct
spans, merged into a trie. No occurrence: an empty tree (a plain autoregressive step).

The copy length adapts: doubled (up to `max_copy_len`) after a draft accepted to its full depth, halved (down to
`min_copy_len`) after a rejection. The budget's max_depth always caps it.

Example (gamma=2): context "x a b c d y a b" -> the key (a, b) occurred before "c d y a b" -> the chain "c d y a b"
(cut to copy_len).
"""

from __future__ import annotations

from typing import Sequence

from specdec.drafters.base import DraftContext, match_length, register_drafter
from specdec.tree import DraftTree, max_depth


@register_drafter("copyspec")
class CopySpecDrafter:
    """gamma: key length; copy_len: starting span length (min_copy_len <= copy_len <= max_copy_len);
    max_branches: distinct earlier occurrences drafted at once."""

    vocab_size = None  # copies token ids from the context: works with any vocabulary

    def __init__(self, gamma: int = 3, copy_len: int = 16, min_copy_len: int = 4, max_copy_len: int = 64,
                 max_branches: int = 3):
        if gamma < 1 or max_branches < 1:
            raise ValueError(f"gamma and max_branches must be >= 1, got gamma={gamma}, max_branches={max_branches}")
        if not 1 <= min_copy_len <= copy_len <= max_copy_len:
            raise ValueError(f"need 1 <= min_copy_len <= copy_len <= max_copy_len, got "
                             f"{min_copy_len}, {copy_len}, {max_copy_len}")
        self.gamma, self.max_branches = gamma, max_branches
        self.copy_len, self.min_copy_len, self.max_copy_len = copy_len, min_copy_len, max_copy_len
        self._tokens: list[int] = []
        self._ends: dict[tuple[int, ...], list[int]] = {}  # γ-gram -> positions just after its occurrences
        self.reset()

    def reset(self) -> None:
        """New sequence. The index is kept until the next context shows whether it extends the old one (the next
        turn of a chat does: its prompt holds the previous turns), else it is rebuilt."""
        self._check_prefix = True

    def observe(self, result) -> None:
        """Grow the copy length after a draft accepted to its full depth, shrink it after a rejection."""
        if len(result.tree) == 0:
            return
        depth = max_depth(result.tree)
        if result.accepted_len >= depth:
            self.copy_len = min(2 * self.copy_len, self.max_copy_len)
        else:
            self.copy_len = max(self.copy_len // 2, self.min_copy_len)

    def propose(self, ctx: DraftContext) -> DraftTree:
        self._index(ctx.token_ids)
        found = self._occurrences(min(self.copy_len, ctx.budget.max_depth))
        if not found:
            return DraftTree.empty()
        return DraftTree.from_paths([span for _, span in found], source="copyspec", max_nodes=ctx.budget.max_nodes,
                                    match_len=match_length(self._tokens, found[0][0]))

    def spans(self, length: int) -> list[list[int]]:
        """Distinct spans that followed earlier occurrences of the context's last γ tokens, most recent first."""
        return [span for _, span in self._occurrences(length)]

    def _occurrences(self, length: int) -> list[tuple[int, list[int]]]:
        """`spans`, each with where it starts in the context: [(end of the γ-gram's occurrence, span)]."""
        tokens, found, seen = self._tokens, [], []
        if len(tokens) < self.gamma or length < 1:
            return found
        for end in reversed(self._ends.get(tuple(tokens[-self.gamma:]), ())):
            span = tokens[end: end + length]
            if span and span not in seen:  # end == len(tokens) is the key itself: nothing follows it yet
                seen.append(span)
                found.append((end, span))
                if len(found) >= self.max_branches:
                    break
        return found

    def _index(self, token_ids: Sequence[int]) -> None:
        """Hash the γ-grams ending at the tokens committed since the last call; rebuild for an unrelated context."""
        known = len(self._tokens)
        extends = len(token_ids) >= known and (
            list(token_ids[:known]) == self._tokens if self._check_prefix
            else known == 0 or token_ids[known - 1] == self._tokens[-1])
        if not extends:
            self._tokens, self._ends, known = [], {}, 0
        self._check_prefix = False
        self._tokens.extend(int(token) for token in token_ids[known:])
        for end in range(max(known + 1, self.gamma), len(self._tokens) + 1):
            self._ends.setdefault(tuple(self._tokens[end - self.gamma:end]), []).append(end)
