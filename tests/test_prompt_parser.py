"""A1111 prompt syntax: emphasis, BREAK and extra-network tags (pure Python, no torch)."""

from __future__ import annotations

import dataclasses

import pytest

from pipelines.prompts.parser import (
    BREAK_MARKER,
    ExtraNetworkRef,
    is_break_marker,
    parse_prompt_attention,
    strip_extra_networks,
)


@pytest.mark.parametrize(
    ("prompt", "expected"),
    [
        # A1111's own doc-test examples (modules/prompt_parser.py), floats to the last bit.
        ("normal text", [("normal text", 1.0)]),
        ("an (important) word", [("an ", 1.0), ("important", 1.1), (" word", 1.0)]),
        ("(unbalanced", [("unbalanced", 1.1)]),
        ("\\(literal\\]", [("(literal]", 1.0)]),
        ("(unnecessary)(parens)", [("unnecessaryparens", 1.1)]),
        (
            "a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
            [
                ("a ", 1.0),
                ("house", 1.5730000000000004),
                (" ", 1.1),
                ("on", 1.0),
                (" a ", 1.1),
                ("hill", 0.55),
                (", sun, ", 1.1),
                ("sky", 1.4641000000000006),
                (".", 1.1),
            ],
        ),
    ],
)
def test_a1111_documented_examples(prompt: str, expected: list[tuple[str, float]]) -> None:
    assert parse_prompt_attention(prompt) == expected


def test_empty_prompt_is_one_empty_fragment() -> None:
    assert parse_prompt_attention("") == [("", 1.0)]


@pytest.mark.parametrize(
    ("prompt", "expected"),
    [
        ("[word]", [("word", 1 / 1.1)]),
        ("[[word]]", [("word", 1 / 1.1 / 1.1)]),
        ("((word))", [("word", 1.1 * 1.1)]),
        ("(word:1.5)", [("word", 1.5)]),
        ("(word: 1.5 )", [("word", 1.5)]),  # newer A1111 allows spaces around the number
        ("((word:2):0.5)", [("word", 1.0)]),
        ("(word:-1)", [("word", -1.0)]),
        ("[a (b) c]", [("a ", 1 / 1.1), ("b", 1.1 / 1.1), (" c", 1 / 1.1)]),
    ],
)
def test_weights_multiply_when_nested(prompt: str, expected: list[tuple[str, float]]) -> None:
    assert parse_prompt_attention(prompt) == expected


@pytest.mark.parametrize(
    ("prompt", "expected"),
    [
        ("a) b] c", [("a) b] c", 1.0)]),  # closers without openers are literal
        ("x:1.5) y", [("x:1.5) y", 1.0)]),  # a weight with no open round bracket is literal
        ("[unclosed (both", [("unclosed ", 1 / 1.1), ("both", 1.1 / 1.1)]),
        ("(a:b)", [("a:b", 1.1)]),  # a colon that is not a weight is text
        ("(a:1.2.3)", [("a:1.2.3", 1.1)]),  # A1111 crashes on this one; we keep it as text
        ("a [b)", [("a ", 1.0), ("b)", 1 / 1.1)]),
    ],
)
def test_unbalanced_and_odd_brackets_are_tolerated(prompt: str, expected: list[tuple[str, float]]) -> None:
    assert parse_prompt_attention(prompt) == expected


def test_escapes_are_literal_characters() -> None:
    assert parse_prompt_attention(r"\(a\) \[b\] c\\d") == [(r"(a) [b] c\d", 1.0)]
    # A lone backslash before an ordinary character is dropped, as in A1111.
    assert parse_prompt_attention(r"a\b") == [("ab", 1.0)]
    assert parse_prompt_attention(r"(\(x\):1.2)") == [("(x)", 1.2)]


def test_break_keyword_becomes_marker() -> None:
    assert parse_prompt_attention("a cat BREAK a dog") == [("a cat", 1.0), BREAK_MARKER, ("a dog", 1.0)]
    assert BREAK_MARKER == ("BREAK", -1)
    assert is_break_marker(("BREAK", -1.0))
    assert not is_break_marker(("BREAK", 1.0))


@pytest.mark.parametrize("prompt", ["a break b", "BREAKFAST", "a BREAKs"])
def test_break_must_be_an_uppercase_word(prompt: str) -> None:
    assert parse_prompt_attention(prompt) == [(prompt, 1.0)]


def test_break_inside_brackets_stays_a_break() -> None:
    # A1111 multiplies the marker's weight here and then encodes the word "BREAK"; we keep the break.
    assert parse_prompt_attention("(a BREAK b)") == [("a", 1.1), BREAK_MARKER, ("b", 1.1)]


def test_leading_break_keeps_empty_fragments_around_marker() -> None:
    assert parse_prompt_attention("BREAK x") == [("", 1.0), BREAK_MARKER, ("x", 1.0)]


def test_strip_extra_networks_returns_tags_in_order() -> None:
    prompt = "1girl, <hypernet:agm:1.1> <extrasupernet:master:12:13:14> <hypernet:ray>, <lora:film grain:0.8>"
    cleaned, refs = strip_extra_networks(prompt)
    assert cleaned == "1girl,   , "
    assert refs == [
        ExtraNetworkRef("hypernet", "agm", ("1.1",)),
        ExtraNetworkRef("extrasupernet", "master", ("12", "13", "14")),
        ExtraNetworkRef("hypernet", "ray", ()),
        ExtraNetworkRef("lora", "film grain", ("0.8",)),
    ]


def test_strip_extra_networks_leaves_other_angle_brackets() -> None:
    assert strip_extra_networks("a <b> c <:x> <lora:>") == ("a <b> c <:x> <lora:>", [])


def test_extra_network_ref_is_frozen() -> None:
    ref = ExtraNetworkRef("lora", "x", ("1",))
    with pytest.raises(dataclasses.FrozenInstanceError):
        ref.name = "y"  # type: ignore[misc]
