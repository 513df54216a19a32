"""What a caption of the synthetic grammar says about its image: the attributes it names.

A caption of :mod:`lightclip_core.data.synthetic` always names a colour and a shape, and may name a size (in any of
the words of ``SIZE_WORDS``) and a position (in any of the phrases of ``POSITION_PHRASES``). :func:`parse_caption`
reads them back with the grammar's own tables, so a new word or phrase there is understood here too. Attributes
are also given as integer codes (the value's index in the grammar's table, :data:`UNNAMED` for one a caption does
not name): the form in which evaluation compares captions with images (attribute-consistent retrieval).
"""
from __future__ import annotations

import re
from dataclasses import astuple, dataclass
from functools import lru_cache
from typing import Any, Mapping

from lightclip_core.data.synthetic import COLOURS, POSITION_PHRASES, POSITIONS, SHAPES, SIZE_WORDS, SIZES

ATTRIBUTES = ("colour", "shape", "size", "position")
UNNAMED = -1  # the code of an attribute a caption does not name


@dataclass(frozen=True)
class NamedAttributes:
    """The attribute values a caption names (None: not named), or all four true values of an image."""

    colour: str | None = None
    shape: str | None = None
    size: str | None = None
    position: str | None = None

    @property
    def specificity(self) -> int:
        """How many attributes are named."""
        return sum(value is not None for value in astuple(self))

    def codes(self) -> tuple[int, ...]:
        """Each attribute's index in the grammar's table of its values, or UNNAMED; in the order of ATTRIBUTES."""
        values = attribute_values()
        return tuple(UNNAMED if getattr(self, a) is None else values[a].index(getattr(self, a)) for a in ATTRIBUTES)

    def is_true_of(self, image: NamedAttributes) -> bool:
        """Whether every attribute named here has the value `image` has."""
        return all(getattr(self, a) is None or getattr(self, a) == getattr(image, a) for a in ATTRIBUTES)


def attribute_values() -> dict[str, tuple[str, ...]]:
    """The values of every attribute, in the grammar's order (the codes index these)."""
    return {"colour": tuple(COLOURS), "shape": tuple(SHAPES), "size": tuple(SIZES), "position": tuple(POSITIONS)}


def _phrases() -> dict[str, dict[str, str]]:
    """attribute -> every word or phrase the grammar uses for one of its values -> that value."""
    return {
        "colour": {colour: colour for colour in COLOURS},
        "shape": {shape: shape for shape in SHAPES},
        "size": {word: size for size, words in SIZE_WORDS.items() for word in words},
        "position": {phrase: position for position, phrases in POSITION_PHRASES.items() for phrase in phrases},
    }


@lru_cache(maxsize=1)
def _patterns() -> dict[str, tuple[re.Pattern[str], dict[str, str]]]:
    """One regular expression per attribute matching any of its phrases as whole words (longest phrase first)."""
    patterns = {}
    for attribute, phrases in _phrases().items():
        alternatives = "|".join(re.escape(p) for p in sorted(phrases, key=len, reverse=True))
        patterns[attribute] = (re.compile(rf"(?<![\w-])(?:{alternatives})(?![\w-])"), phrases)
    return patterns


def _normalise(caption: str) -> str:
    """Lower case, single spaces: the form the grammar's tables are matched against."""
    return " ".join(caption.lower().split())


def parse_caption(caption: str) -> NamedAttributes:
    """The attributes `caption` names. Raises ValueError if it names two values of one attribute (no caption of
    the grammar does)."""
    text = _normalise(caption)
    named: dict[str, str] = {}
    for attribute, (pattern, phrases) in _patterns().items():
        values = {phrases[match.group(0)] for match in pattern.finditer(text)}
        if len(values) > 1:
            raise ValueError(f"caption {caption!r} names several values of {attribute}: {sorted(values)}")
        if values:
            named[attribute] = values.pop()
    return NamedAttributes(**named)


def true_attributes(meta: Mapping[str, Any]) -> NamedAttributes:
    """The four attributes of a synthetic sample, from its metadata; ValueError if one is missing or unknown."""
    values = attribute_values()
    for attribute in ATTRIBUTES:
        if meta.get(attribute) not in values[attribute]:
            raise ValueError(f"sample metadata has {attribute}={meta.get(attribute)!r}; expected one of "
                             f"{list(values[attribute])}")
    return NamedAttributes(**{attribute: str(meta[attribute]) for attribute in ATTRIBUTES})
