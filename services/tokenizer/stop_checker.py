"""Stop strings over a stream of text deltas.

The detokenizer hands out text in arbitrary pieces, so a stop string may arrive split across
deltas. Text that could still turn out to be the start of a stop string is held back until the
next delta settles it; at most `max(len(stop)) - 1` characters are ever held, so the client
sees text with at most that lag, and never sees the stop string or anything after it.
"""

from __future__ import annotations

from collections.abc import Sequence


class StopChecker:
    """Cuts a stream of deltas at the first stop string; one instance per request."""

    def __init__(self, stop: Sequence[str]) -> None:
        if any(not s for s in stop):
            # An empty string "occurs" everywhere; validation rejects it before we get here.
            raise ValueError("stop strings must be non-empty")
        self._stop = tuple(dict.fromkeys(stop))
        self._max_held_chars = max((len(s) for s in self._stop), default=1) - 1
        self._held = ""
        self._stopped = False

    def push(self, delta: str) -> tuple[str, bool]:
        """Returns the text safe to emit now and whether a stop string was found.

        Once a stop string is found every later push returns ("", True).
        """
        if self._stopped:
            return "", True
        text = self._held + delta
        # Only the held text plus this delta is searched: any match starting earlier would
        # have been found by an earlier push, because that text was held, not emitted.
        stop_at = self._earliest_match(text)
        if stop_at is not None:
            self._held = ""
            self._stopped = True
            return text[:stop_at], True
        num_held = self._num_partial_chars(text)
        self._held = text[len(text) - num_held :]
        return text[: len(text) - num_held], False

    def flush(self) -> str:
        """Returns the held text at the end of the stream (empty once stopped)."""
        held, self._held = self._held, ""  # a stop clears it: nothing after a stop comes out
        return held

    def _earliest_match(self, text: str) -> int | None:
        """Start of the match that is complete first (ties: the one starting first).

        Ordering by end, not start, makes the result independent of how the text was split:
        with stops "abcd" and "bc", streamed "a", "b", "c" stops at "bc" before "d" exists,
        so "abcd" in one delta must stop there too. Per stop string the first match ends first.
        """
        matches = [
            (start + len(s), start) for s in self._stop if (start := text.find(s)) >= 0
        ]
        return min(matches)[1] if matches else None

    def _num_partial_chars(self, text: str) -> int:
        """Length of the longest suffix of `text` that is a proper prefix of a stop string."""
        for num_chars in range(min(len(text), self._max_held_chars), 0, -1):
            suffix = text[-num_chars:]
            if any(s.startswith(suffix) for s in self._stop):
                return num_chars
        return 0
