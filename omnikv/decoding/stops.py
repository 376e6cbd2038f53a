"""Stop strings: the one matcher of `generation.Session` and the server's decode loops.

A stop string may arrive split over several pieces ("\\n" + "User:"), so text that could still be
the start of a stop string is held back until it either completes the stop string (then it and
everything after it is dropped) or can no longer match (then it is released). This keeps streamed
output identical to non-streamed output and never leaks part of a stop string.
"""

from __future__ import annotations


class StopMatcher:
    """`feed` pieces of a stream (the server), or `scan` the whole text so far (`Session`, which
    re-decodes all generated ids each step)."""

    def __init__(self, stops: tuple[str, ...] | list[str]) -> None:
        self.stops = tuple(s for s in stops if s)
        self._held = ""  # text not yet released because a stop string might start in it
        self.stopped = False

    def scan(self, text: str) -> tuple[int | None, int]:
        """(where the first stop string starts or None, how much of `text` is safe to emit: all
        but a tail that could still start a stop string)."""
        cut = min((i for i in (text.find(s) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            return cut, cut
        return None, len(text) - self._longest_partial_suffix(text)

    def feed(self, piece: str) -> str:
        """Add a piece; return the text now safe to emit ("" after a stop string was seen)."""
        if self.stopped:
            return ""
        text = self._held + piece
        cut, safe = self.scan(text)
        if cut is not None:
            self.stopped = True
            self._held = ""
            return text[:cut]
        self._held = text[safe:]
        return text[:safe]

    def flush(self) -> str:
        """Release held text at the end of generation (it never completed a stop string)."""
        out, self._held = ("" if self.stopped else self._held), ""
        return out

    def _longest_partial_suffix(self, text: str) -> int:
        """Length of the longest suffix of `text` that is a proper prefix of some stop string."""
        best = 0
        for s in self.stops:
            for n in range(min(len(s) - 1, len(text)), best, -1):
                if text.endswith(s[:n]):
                    best = n
                    break
        return best
