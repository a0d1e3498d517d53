"""Hostile JSON for the fuzz tests of the files reconnectd reads (state.json, status.json):
integers too long for Python 3.11+ to read, NaN and Infinity, controls and unpaired
surrogates in text, values of every type where any other was expected."""

from __future__ import annotations

import json

from hypothesis import strategies as st


class Huge:
    """An integer literal too long for Python 3.11+ to read (its digits limit)."""

    def __init__(self, digits: int) -> None:
        self.digits = digits


def dump(value: object) -> str:
    """json.dumps (NaN and Infinity included), with Huge written as its digits, which
    json.dumps itself cannot write."""
    if isinstance(value, Huge):
        return "7" * value.digits
    if isinstance(value, list):
        return "[" + ", ".join(dump(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{json.dumps(k)}: {dump(v)}" for k, v in value.items()) + "}"
    return json.dumps(value)


def has_huge(value: object) -> bool:
    """Return whether a Huge is in value: then Python 3.11+ cannot read the file at all."""
    if isinstance(value, list):
        return any(has_huge(v) for v in value)
    if isinstance(value, dict):
        return any(has_huge(v) for v in value.values())
    return isinstance(value, Huge)


# Text with controls and unpaired surrogates (JSON writes them as \u escapes).
texts = st.text(st.characters(exclude_categories=()), max_size=20)


def json_values(keys: list[str]) -> st.SearchStrategy[object]:
    """Given the keys a reader looks for, return JSON values of any shape, their object
    keys often those."""
    return st.recursive(
        st.none()
        | st.booleans()
        | st.integers()
        | st.sampled_from([0, -1, 2**31 - 1, 2**31, 2**63, -(2**31), 10**4000])
        | st.builds(Huge, st.integers(min_value=4301, max_value=100_000))
        | st.floats(allow_nan=True, allow_infinity=True)
        | texts,
        lambda inner: (
            st.lists(inner, max_size=4)
            | st.dictionaries(st.sampled_from(keys) | texts, inner, max_size=4)
        ),
        max_leaves=20,
    )
