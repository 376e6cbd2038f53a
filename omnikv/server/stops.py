"""Stop strings over a stream of text pieces.

A stop string may arrive split over several pieces ("\\n" + "User:"), so text that could still be
the start of a stop string is held back until it either completes the stop string (then it and
everything after it is dropped) or can no longer match (then it is released). This keeps streamed
output identical to non-streamed output and never leaks part of a stop string.
"""

from __future__ import annotations


class StopMatcher:
    def __init__(self, stops: tuple[str, ...] | list[str]) -> None:
        self.stops = tuple(s for s in stops if s)
        self._held = ""  # text not yet released because a stop string might start in it
        self.stopped = False

    def feed(self, piece: str) -> str:
        """Add a piece; return the text now safe to emit ("" after a stop string was seen)."""
        if self.stopped:
            return ""
        text = self._held + piece
        cut = min((i for i in (text.find(s) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            self.stopped = True
            self._held = ""
            return text[:cut]
        keep = self._longest_partial_suffix(text)
        self._held = text[len(text) - keep:] if keep else ""
        return text[: len(text) - keep]

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
