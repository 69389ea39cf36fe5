"""Stopping rules shared by the reference decoder and the speculative generator, as HF `generate` has them:
EOS (the EOS token is kept), `max_new_tokens`, stop strings (the text up to and including the stop string is kept,
like HF's `stop_strings`: generation ends on the token that completes it), and the model's context window."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence


@dataclass
class StopRule:
    """eos_token_ids: token ids that end a generation;  room: tokens the context window still admits."""

    max_new_tokens: int
    eos_token_ids: frozenset[int] = frozenset()
    stop_strings: tuple[str, ...] = ()
    tokenizer: Any = None
    room: int | None = None
    reason: str | None = field(default=None, init=False)

    def __post_init__(self) -> None:
        if isinstance(self.max_new_tokens, bool) or not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be an int >= 0, got {self.max_new_tokens!r}")
        if self.stop_strings and self.tokenizer is None:
            raise ValueError("stop strings need a tokenizer to read the generated text; pass tokenizer=...")
        self._tail = max((len(s) for s in self.stop_strings), default=0)

    @property
    def limit(self) -> int:
        """How many new tokens may be generated at most."""
        return self.max_new_tokens if self.room is None else min(self.max_new_tokens, self.room)

    def cut(self, generated: Sequence[int], start: int) -> int | None:
        """Given all generated tokens of which those from `start` are new, the length to truncate to if the
        generation ends within the new ones, else None. Sets `reason`."""
        for end in range(start + 1, len(generated) + 1):
            if end > self.limit:
                self.reason = "length" if self.limit == self.max_new_tokens else "context"
                return end - 1
            if generated[end - 1] in self.eos_token_ids:
                self.reason = "eos"
                return end
            if self._tail and self._ends_in_stop_string(generated[:end]):
                self.reason = "stop_string"
                return end
        if len(generated) >= self.limit:
            self.reason = "length" if self.limit == self.max_new_tokens else "context"
            return len(generated)
        return None

    def _ends_in_stop_string(self, generated: Sequence[int]) -> bool:
        """Does the text of the last tokens contain a stop string that the last token completed?"""
        window = self.tokenizer.decode(generated[-(self._tail + 8):], skip_special_tokens=False)
        without_last = self.tokenizer.decode(generated[-(self._tail + 8):-1], skip_special_tokens=False)
        return any(s in window and s not in without_last for s in self.stop_strings)
