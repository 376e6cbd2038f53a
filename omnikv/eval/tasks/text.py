"""Haystack text and word lists, all generated or shipped locally (nothing is downloaded).

Haystacks are produced as lists of *units* (sentences) so generators can fit a prompt length unit by
unit and insert needles between units:

- "noise": RULER's repeated five-sentence noise ("The grass is green. ...").
- "narrative": a seeded story of varied, digit-free sentences. Small models retrieve best from this
  (docs/evaluation.md, small-model guidance); it contains no digits, so numeric needles stand out
  only by meaning, not by being the only numbers in sight.
- "pydoc": docstrings of Python standard-library modules (present on every machine), split into
  sentences (those with digits dropped). Not comparable with RULER's Paul Graham essays, but real prose.
"""

from __future__ import annotations

import random
import re
from typing import Callable

from omnikv.errors import ConfigError

NOISE_SENTENCES: tuple[str, ...] = (
    "The grass is green.",
    "The sky is blue.",
    "The sun is yellow.",
    "Here we go.",
    "There and back again.",
)

# Word lists written for this project. Keys of NIAH needles are adjective-noun pairs, as in RULER.
ADJECTIVES: tuple[str, ...] = tuple(
    """ancient bitter brave bright calm careful cheerful clever cold crisp curious damp dark
    delicate distant dusty eager early elegant empty fierce fragile frozen gentle gloomy golden
    graceful hidden hollow humble icy jolly lively lonely loud lucky mellow misty narrow noble
    patient plain polished proud quiet rapid rare restless rough rusty salty shallow sharp shy
    silent silky sleepy slow smooth soft solemn sour steady sticky stormy strange sturdy sudden
    sunny swift tame tender thick tidy tiny vast velvet vivid wandering warm weary wild wise
    wooden young zealous""".split()
)
NOUNS: tuple[str, ...] = tuple(
    """anchor apple arrow badger basket beacon blanket bottle bridge bucket candle canyon carpet
    castle cedar chimney cloud comet compass cottage crystal curtain desert dolphin dragon drum
    eagle ember falcon feather fiddle forest fountain garden glacier harbor helmet hermit island
    jacket kettle ladder lantern lemon lighthouse marble meadow mirror monkey mountain needle
    orchard otter paddle parrot pebble pepper pillow pine planet puddle quarry rabbit raven ribbon
    river saddle sailor shadow shell spider spoon statue stone sunset teapot thimble thunder tiger
    tower trumpet tulip valley violin wagon walnut whale willow window wizard""".split()
)
# Frequent everyday words for the common-words task (RULER draws them from the wonderwords package).
COMMON_WORDS: tuple[str, ...] = tuple(
    sorted(set(ADJECTIVES + NOUNS + tuple(
        """accept admire answer arrive bake borrow breathe build carry chase climb collect cook
        dance deliver dig drift explore fold gather glow guide hammer hurry imagine invent juggle
        knit laugh listen march mend nibble obey paint plant polish pour pretend pull question
        repair rescue ride scatter search sew shiver sing skip sneeze sparkle stir swim tickle
        travel tumble unlock visit wander whisper wobble wrap yawn""".split()
    )))
)

_NAMES = ("Mara", "Tobin", "Elsie", "Corin", "Hattie", "Leland", "Nadia", "Oswin", "Priya", "Rufus",
          "Selma", "Theo", "Una", "Wendell", "Yara", "Bram")
_VERBS = ("carried", "painted", "mended", "found", "hid", "polished", "traded", "sketched", "lost",
          "admired", "wrapped", "buried", "measured", "borrowed", "returned", "described")
_PLACES = ("by the river", "in the old mill", "near the harbor", "under the willow", "at the market",
           "behind the chapel", "on the hill road", "inside the greenhouse", "beside the well",
           "in the quiet library", "along the cliff path", "at the edge of the forest")
_TIMES = ("at dawn", "before supper", "one rainy morning", "late in the evening", "during the fair",
          "after the storm", "while the bells rang", "as the fog lifted", "that autumn",
          "in the middle of winter")
_FEELINGS = ("hopeful", "tired", "amused", "uneasy", "proud", "puzzled", "content", "restless")
_TEMPLATES = (
    "{name} {verb} the {adj} {noun} {place} {time}.",
    "{time_cap}, {name} {verb} {a_adj} {noun} {place}.",
    "Nobody knew why {name} {verb} the {noun}, but everyone agreed it looked {adj}.",
    "The {noun} {place} seemed {adj}, and {name} felt {feeling} about it.",
    "{name} once said that {a_adj} {noun} is worth more than {a_noun2}.",
    "{place_cap}, the villagers talked about the {adj} {noun} for a long time.",
    "{name} and {name2} walked {place} {time}, speaking of the {noun}.",
    "It was {time} when {name} first noticed the {adj} {noun}.",
)


def _a(word: str) -> str:
    return ("an " if word[0] in "aeiou" else "a ") + word


def narrative_sentence(seed: int, i: int) -> str:
    """Sentence `i` of the seeded story. It depends only on (seed, i), so a longer haystack extends
    a shorter one: fitting a length by adding units never reshuffles the text before."""
    rng = random.Random(f"narrative:{seed}:{i}")
    tmpl = _TEMPLATES[rng.randrange(len(_TEMPLATES))]
    time, place = rng.choice(_TIMES), rng.choice(_PLACES)
    adj = rng.choice(ADJECTIVES)
    names = rng.sample(_NAMES, 2)
    return tmpl.format(
        name=names[0], name2=names[1], verb=rng.choice(_VERBS), adj=adj, a_adj=_a(adj),
        noun=rng.choice(NOUNS), a_noun2=_a(rng.choice(NOUNS)), place=place,
        place_cap=place[0].upper() + place[1:], time=time, time_cap=time[0].upper() + time[1:],
        feeling=rng.choice(_FEELINGS),
    )


def narrative_units(n: int, seed: int) -> list[str]:
    """`n` varied, digit-free narrative sentences; the same seed gives the same story."""
    return [narrative_sentence(seed, i) for i in range(n)]


_PYDOC_MODULES = ("textwrap", "collections", "functools", "itertools", "json", "argparse", "string",
                  "pathlib", "inspect", "logging", "shutil", "tempfile", "difflib", "heapq",
                  "contextlib", "dataclasses", "enum", "fractions", "statistics", "typing")
_pydoc_cache: list[str] | None = None


def _pydoc_sentences() -> list[str]:
    """Sentences of stdlib docstrings (whitespace collapsed; sentences with digits dropped so
    numeric needles are the only numbers), in a fixed order."""
    global _pydoc_cache
    if _pydoc_cache is None:
        import importlib
        import inspect
        import warnings

        sentences: list[str] = []
        with warnings.catch_warnings():  # e.g. typing.io's deprecation warning on attribute access
            warnings.simplefilter("ignore")
            for mod_name in _PYDOC_MODULES:
                mod = importlib.import_module(mod_name)
                docs = [inspect.getdoc(mod) or ""]
                for attr in sorted(vars(mod)):
                    obj = getattr(mod, attr)
                    if not attr.startswith("_") and (inspect.isclass(obj) or inspect.isfunction(obj)):
                        docs.append(inspect.getdoc(obj) or "")
                for doc in docs:
                    text = re.sub(r"\s+", " ", doc).strip()
                    for sent in re.split(r"(?<=[.!?])\s+", text):
                        ok = len(sent) > 20 and sent[0].isupper() and sent[-1] in ".!?"
                        if ok and not re.search(r"[0-9]", sent):
                            sentences.append(sent)
        _pydoc_cache = list(dict.fromkeys(sentences))  # drop repeats, keep order
    return _pydoc_cache


def pydoc_units(n: int, seed: int) -> list[str]:
    """`n` sentences of stdlib documentation, starting at a seeded offset and wrapping around."""
    pool = _pydoc_sentences()
    start = random.Random(f"pydoc:{seed}").randrange(len(pool))
    return [pool[(start + i) % len(pool)] for i in range(n)]


HAYSTACKS = ("noise", "narrative", "pydoc")


def unit_source(kind: str, seed: int) -> Callable[[int], str]:
    """A function i -> unit i of haystack `kind` (one of HAYSTACKS) for this seed."""
    if kind == "noise":
        return lambda i: NOISE_SENTENCES[i % len(NOISE_SENTENCES)]
    if kind == "narrative":
        return lambda i: narrative_sentence(seed, i)
    if kind == "pydoc":
        pool = _pydoc_sentences()
        start = random.Random(f"pydoc:{seed}").randrange(len(pool))
        return lambda i: pool[(start + i) % len(pool)]
    raise ConfigError(f"unknown haystack {kind!r}; choose one of {', '.join(HAYSTACKS)}")


def haystack_units(kind: str, n: int, seed: int) -> list[str]:
    """`n` units of haystack `kind` (one of HAYSTACKS)."""
    src = unit_source(kind, seed)
    return [src(i) for i in range(n)]


class UnitPool:
    """Caches units 0..n-1 of a unit source, so repeated renders during length fitting are cheap."""

    def __init__(self, source: Callable[[int], str]) -> None:
        self._source = source
        self._units: list[str] = []

    def take(self, n: int) -> list[str]:
        while len(self._units) < n:
            self._units.append(self._source(len(self._units)))
        return self._units[:n]

    def tail(self, joiner: str) -> Callable[[int], str]:
        """n -> the text that would follow n units (for `fit_length`'s partial-sentence fill)."""
        return lambda n: joiner + self.take(n + 1)[n]
