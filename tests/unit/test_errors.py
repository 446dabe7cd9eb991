"""Client strings are echoed in messages only up to a bound."""

from __future__ import annotations

from serving.errors import MAX_ECHOED_CHARACTERS, shown


def test_short_strings_are_quoted_whole():
    assert shown("mnist37") == "'mnist37'"


def test_long_strings_are_cut_and_their_length_named():
    text = shown("n" * 3_000_000)
    assert len(text) < MAX_ECHOED_CHARACTERS + 40
    assert text.startswith("'nnn") and text.endswith("... (3000000 characters)")


def test_unprintable_characters_cannot_multiply_the_length():
    text = shown("\U0002ebe1" * 100)
    assert len(text) < MAX_ECHOED_CHARACTERS + 40
