"""AUTOMATIC1111-compatible prompt syntax: attention weights, ``BREAK`` and extra-network tags.

Users paste prompts from A1111 and expect them to mean the same thing here, so the rules follow
A1111's ``modules/prompt_parser.py`` and ``modules/extra_networks.py`` (including its tolerance of
unbalanced brackets and the exact order in which multipliers are applied, which decides the last
bits of the resulting floats). Two deliberate differences, both cases where A1111 misbehaves:

* a malformed explicit weight such as ``(word:1.2.3)`` makes A1111 raise; here the ``:1.2.3`` is kept
  as text and the bracket counts as a plain ``(...)``;
* ``BREAK`` inside brackets, e.g. ``(a BREAK b)``, has its marker weight multiplied in A1111 so the
  marker stops being recognised and the word ``BREAK`` gets encoded; here it stays a chunk break.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

ROUND_BRACKET_MULTIPLIER = 1.1
SQUARE_BRACKET_MULTIPLIER = 1 / 1.1

BREAK_TEXT = "BREAK"
BREAK_WEIGHT = -1.0
BREAK_MARKER: tuple[str, float] = (BREAK_TEXT, BREAK_WEIGHT)
"""The fragment ``parse_prompt_attention`` emits where the prompt says ``BREAK`` (A1111's encoding)."""

# One alternative per syntactic unit; the order matters (escapes before brackets, an explicit
# weight ``:1.5)`` before a bare ``:``).
_ATTENTION_TOKEN = re.compile(
    r"""
    (?P<escaped>\\[()\[\]\\]?)                        # \( \) \[ \] \\ or a lone backslash
    | (?P<weight_close>:\s*(?P<weight>[+-]?[.\d]+)\s*\))  # ":1.5)" closes a round bracket
    | (?P<open>[(\[])
    | (?P<close>[)\]])
    | (?P<text>[^\\()\[\]:]+)
    | (?P<colon>:)
    """,
    re.VERBOSE,
)
_BREAK_KEYWORD = re.compile(r"\s*\bBREAK\b\s*", re.DOTALL)
_EXTRA_NETWORK_TAG = re.compile(r"<(\w+):([^>]+)>")


def is_break_marker(fragment: tuple[str, float]) -> bool:
    """Whether a fragment from :func:`parse_prompt_attention` is a ``BREAK`` chunk boundary."""
    return fragment[0] == BREAK_TEXT and fragment[1] == BREAK_WEIGHT


def parse_prompt_attention(text: str) -> list[tuple[str, float]]:
    """Split a prompt into ``(text, weight)`` fragments using A1111's emphasis syntax.

    ``(word)`` multiplies by 1.1, ``[word]`` divides by 1.1, ``(word:1.5)`` multiplies by 1.5, and
    nesting multiplies. ``\\(`` ``\\)`` ``\\[`` ``\\]`` ``\\\\`` are literal characters (a lone
    backslash is dropped). Brackets never closed apply to the end of the prompt; a closing bracket
    with no opener is literal text. Neighbouring fragments of equal weight are merged. The word
    ``BREAK`` (uppercase, on its own) becomes :data:`BREAK_MARKER`. An empty prompt gives
    ``[("", 1.0)]``.
    """
    # Lists, not tuples: weights are multiplied in place as brackets close.
    fragments: list[list] = []
    open_round: list[int] = []
    open_square: list[int] = []

    def multiply_from(start: int, multiplier: float) -> None:
        for fragment in fragments[start:]:
            if fragment[1] is not None:  # None marks a BREAK; weights never touch it.
                fragment[1] *= multiplier

    def add_text(piece: str) -> None:
        for index, part in enumerate(_BREAK_KEYWORD.split(piece)):
            if index:
                fragments.append([BREAK_TEXT, None])
            fragments.append([part, 1.0])

    for match in _ATTENTION_TOKEN.finditer(text):
        if match["escaped"] is not None:
            fragments.append([match["escaped"][1:], 1.0])
        elif match["open"] == "(":
            open_round.append(len(fragments))
        elif match["open"] == "[":
            open_square.append(len(fragments))
        elif match["weight_close"] is not None and open_round:
            weight = _parse_weight(match["weight"])
            if weight is None:
                add_text(match["weight_close"][:-1])
                multiply_from(open_round.pop(), ROUND_BRACKET_MULTIPLIER)
            else:
                multiply_from(open_round.pop(), weight)
        elif match["close"] == ")" and open_round:
            multiply_from(open_round.pop(), ROUND_BRACKET_MULTIPLIER)
        elif match["close"] == "]" and open_square:
            multiply_from(open_square.pop(), SQUARE_BRACKET_MULTIPLIER)
        else:
            add_text(match[0])

    # Unclosed brackets reach to the end, outermost first, round before square (A1111's order).
    for start in open_round:
        multiply_from(start, ROUND_BRACKET_MULTIPLIER)
    for start in open_square:
        multiply_from(start, SQUARE_BRACKET_MULTIPLIER)

    merged: list[tuple[str, float]] = []
    for fragment_text, weight in fragments:
        if weight is None:
            merged.append(BREAK_MARKER)
        elif merged and merged[-1][1] == weight and not is_break_marker(merged[-1]):
            merged[-1] = (merged[-1][0] + fragment_text, weight)
        else:
            merged.append((fragment_text, weight))
    return merged or [("", 1.0)]


def _parse_weight(number: str) -> float | None:
    try:
        return float(number)
    except ValueError:  # "[.\d]+" also matches "1.2.3" or "."
        return None


@dataclass(frozen=True)
class ExtraNetworkRef:
    """One ``<kind:name[:arg...]>`` tag, e.g. ``<lora:film_grain:0.8>`` -> kind ``lora``, name
    ``film_grain``, args ``("0.8",)``. Arguments stay strings: their meaning belongs to the kind."""

    kind: str
    name: str
    args: tuple[str, ...] = ()


def strip_extra_networks(text: str) -> tuple[str, list[ExtraNetworkRef]]:
    """Remove A1111 extra-network tags from a prompt and return them in prompt order.

    The tags are cut out verbatim (surrounding whitespace and commas are left alone, as in A1111),
    so ``"a cat <lora:x:1>"`` becomes ``"a cat "``.
    """
    found: list[ExtraNetworkRef] = []

    def take(match: re.Match[str]) -> str:
        name, *args = match[2].split(":")
        found.append(ExtraNetworkRef(kind=match[1], name=name, args=tuple(args)))
        return ""

    return _EXTRA_NETWORK_TAG.sub(take, text), found
