"""The parts a policy is made of, by the names users type.

Every scorer, allocator and reducer is a frozen dataclass whose fields are its options, with their
defaults, checked in its own ``__post_init__``; one decorator line registers it::

    @SCORERS.register("keydiff")
    @dataclass(frozen=True)
    class KeyDiffScorer(Scorer):
        ...

The config (:mod:`vllm_kvcompress.policies.config`), the presets, the CLI help and the request validator
read names and options from here, so a new part needs nothing else.
"""
from __future__ import annotations

import dataclasses
import math


class Registry:
    """Parts of one kind (``"scorer"``, ``"allocator"``, ``"reducer"``) by name."""

    def __init__(self, kind: str):
        self.kind = kind
        self.parts: dict[str, type] = {}

    def register(self, name: str):
        """Class decorator: the part ``name`` is this class."""
        def add(cls: type) -> type:
            if name in self.parts:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self.parts[name] = cls
            return cls
        return add

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self.parts)

    def part(self, name: str) -> type:
        """The class registered as ``name``; ValueError listing the valid names otherwise."""
        if name not in self.parts:
            raise ValueError(f"unknown {self.kind} {name!r}; valid {self.kind}s: {', '.join(self.parts)}")
        return self.parts[name]

    def options(self, name: str) -> dict:
        """The options of part ``name`` a config may set, and their defaults. A field whose
        metadata names ``from_config`` is not one: it is read from that config field (a file)."""
        return {f.name: f.default for f in dataclasses.fields(self.part(name))
                if f.init and "from_config" not in f.metadata}

    def resources(self, name: str) -> dict[str, str]:
        """The fields of part ``name`` that come from config fields: field -> config field."""
        return {f.name: f.metadata["from_config"] for f in dataclasses.fields(self.part(name))
                if "from_config" in f.metadata}

    def build(self, name: str, options: dict | None = None, **resources):
        """Part ``name`` with ``options`` (the others at their defaults), checked by the part;
        ``resources``: the fields :meth:`resources` names, already read."""
        options = dict(options or {})
        unknown = sorted(set(options) - set(self.options(name)))
        if unknown:
            valid = ", ".join(self.options(name)) or "none"
            raise ValueError(f"unknown option(s) {unknown} of {self.kind} {name!r}; its options: {valid}")
        try:
            return self.part(name)(**options, **resources)
        except ValueError as error:  # say whose option it was
            raise ValueError(f"{self.kind} {name!r}: {error}") from None


SCORERS = Registry("scorer")
ALLOCATORS = Registry("allocator")
REDUCERS = Registry("reducer")
KINDS = {"scorer": SCORERS, "allocator": ALLOCATORS, "reducer": REDUCERS}


# ---- checks a part's __post_init__ makes of its options ---------------------------------------------
def check_choice(name: str, value, valid: tuple[str, ...]) -> None:
    if value not in valid:
        raise ValueError(f"unknown {name} {value!r}; valid {name}s: {', '.join(valid)}")


def check_int(name: str, value, minimum: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


def check_number(name: str, value, low: float, high: float, open_low: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
        raise ValueError(f"{name} must be a number, got {value!r}")
    if value > high or value < low or (open_low and value == low):
        bracket = "(" if open_low else "["
        raise ValueError(f"{name} must be in {bracket}{low}, {high}], got {value!r}")


def check_bool(name: str, value) -> None:
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be true or false, got {value!r}")
