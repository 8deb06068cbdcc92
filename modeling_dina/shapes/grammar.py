"""Prompt grammar of the Shapes world: counts ("two red circles"), relations ("a red circle left of a blue square")."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import permutations, product
from typing import Protocol

__all__ = [
    "ATTRIBUTES",
    "CheckResult",
    "COLOURS",
    "COUNT_WORDS",
    "SHAPES",
    "ObjectSpec",
    "PromptSpec",
    "all_prompts",
    "evaluate_objects",
    "alternate_kinds",
    "group_by_kind",
    "parse_prompt",
    "vocabulary",
]

SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
COLOURS: tuple[str, ...] = ("red", "green", "blue", "yellow")
COUNT_WORDS: dict[int, str] = {1: "one", 2: "two", 3: "three"}
RELATIONS: tuple[str, ...] = ("left", "right")
# Attributes the checker reports, in the order used everywhere (position applies to relation prompts only).
ATTRIBUTES: tuple[str, ...] = ("colour", "shape", "count", "position")

_NUMBERS = {w: n for n, w in COUNT_WORDS.items()}
_COUNT_RE = re.compile(rf"^({'|'.join(_NUMBERS)}) ({'|'.join(COLOURS)}) ({'|'.join(SHAPES)})s?$")
_OBJ = rf"a ({'|'.join(COLOURS)}) ({'|'.join(SHAPES)})"
_RELATION_RE = re.compile(rf"^{_OBJ} ({'|'.join(RELATIONS)}) of {_OBJ}$")


@dataclass(frozen=True)
class ObjectSpec:
    colour: str
    shape: str


@dataclass(frozen=True)
class PromptSpec:
    """A parsed prompt. Count prompts: `objects == (obj,)`, `count` = N. Relation prompts: `objects == (A, B)`,
    `count == 2` and `relation` in {"left", "right"} meaning "A is `relation` of B"."""

    kind: str
    objects: tuple[ObjectSpec, ...]
    count: int
    relation: str | None = None

    @property
    def text(self) -> str:
        if self.kind == "count":
            obj = self.objects[0]
            plural = "s" if self.count > 1 else ""
            return f"{COUNT_WORDS[self.count]} {obj.colour} {obj.shape}{plural}"
        a, b = self.objects
        return f"a {a.colour} {a.shape} {self.relation} of a {b.colour} {b.shape}"

    @property
    def attributes(self) -> tuple[str, ...]:
        """The attributes this prompt constrains."""
        return ATTRIBUTES if self.kind == "relation" else ATTRIBUTES[:3]


def parse_prompt(text: str) -> PromptSpec:
    """Parse a prompt of the grammar (case and surrounding whitespace are ignored)."""
    norm = " ".join(text.lower().split())
    if m := _COUNT_RE.match(norm):
        number, colour, shape = m.groups()
        count = _NUMBERS[number]
        spec = PromptSpec("count", (ObjectSpec(colour, shape),), count)
    elif m := _RELATION_RE.match(norm):
        c1, s1, rel, c2, s2 = m.groups()
        spec = PromptSpec("relation", (ObjectSpec(c1, s1), ObjectSpec(c2, s2)), 2, rel)
    else:
        raise ValueError(f"not a Shapes-world prompt: {text!r}")
    if spec.text != norm:  # rejects wrong plurals / articles such as "one red circles" or "two red circle"
        raise ValueError(f"not a Shapes-world prompt: {text!r} (did you mean {spec.text!r}?)")
    return spec


def all_prompts(kind: str | None = None) -> list[str]:
    """Every prompt of the grammar (36 count + 264 relation prompts), in a fixed order."""
    if kind not in (None, "count", "relation"):
        raise ValueError(f"kind must be None, 'count' or 'relation', got {kind!r}")
    objects = [ObjectSpec(c, s) for c, s in product(COLOURS, SHAPES)]
    specs: list[PromptSpec] = []
    if kind in (None, "count"):
        specs += [PromptSpec("count", (o,), n) for o in objects for n in COUNT_WORDS]
    if kind in (None, "relation"):
        specs += [
            PromptSpec("relation", (a, b), 2, rel) for a in objects for b in objects if a != b for rel in RELATIONS
        ]
    return [s.text for s in specs]


def group_by_kind(prompts: Sequence[str]) -> list[list[str]]:
    """The prompts split into count and relation prompts (empty groups left out), in their order."""
    groups = [[p for p in prompts if parse_prompt(p).kind == kind] for kind in ("count", "relation")]
    return [g for g in groups if g]


def alternate_kinds(prompts: Sequence[str], count: int) -> list[str]:
    """`count` prompts taken from the count and relation prompts in turn, each kind cycled in its order (so both kinds
    weigh equally, although there are far more relation prompts)."""
    by_kind = group_by_kind(prompts)
    if not by_kind:
        raise ValueError("prompts must not be empty")
    return [by_kind[i % len(by_kind)][(i // len(by_kind)) % len(by_kind[i % len(by_kind)])] for i in range(count)]


def vocabulary() -> list[str]:
    """All words the grammar uses (for the generator's word-level tokenizers)."""
    return sorted({w for p in all_prompts() for w in p.split()})


class _Object(Protocol):
    colour: str
    shape: str
    x: float


@dataclass(frozen=True)
class CheckResult:
    """Which attributes of a prompt an image satisfies; `position` is None for count prompts."""

    colour: bool
    shape: bool
    count: bool
    position: bool | None

    @property
    def overall(self) -> bool:
        return self.colour and self.shape and self.count and self.position is not False

    @property
    def violations(self) -> list[str]:
        return [a for a in ATTRIBUTES if getattr(self, a) is False]

    @property
    def score(self) -> int:
        """Number of satisfied attributes plus one when all hold (for ranking samples)."""
        return sum(getattr(self, a) is True for a in ATTRIBUTES) + self.overall

    def as_dict(self) -> dict[str, bool | None]:
        return {**{a: getattr(self, a) for a in ATTRIBUTES}, "overall": self.overall}


def _match(obj: _Object, want: ObjectSpec) -> int:
    return (obj.colour == want.colour) + (obj.shape == want.shape)


def _relation_result(spec: PromptSpec, objects: Sequence[_Object], oa: _Object, ob: _Object) -> CheckResult:
    """The result when `oa` stands for A and `ob` for B: colour / shape hold iff the two have A's and B's colour /
    shape (so swapped bindings fail) and any other object has one of them; position iff they are in order."""
    a, b = spec.objects
    others = [o for o in objects if o is not oa and o is not ob]

    def holds(attr: str) -> bool:
        wanted = (getattr(a, attr), getattr(b, attr))
        return (getattr(oa, attr), getattr(ob, attr)) == wanted and all(getattr(o, attr) in wanted for o in others)

    ordered = (oa.x < ob.x) if spec.relation == "left" else (oa.x > ob.x)
    return CheckResult(colour=holds("colour"), shape=holds("shape"), count=len(objects) == 2, position=ordered)


def evaluate_objects(spec: PromptSpec, objects: Sequence[_Object]) -> CheckResult:
    """Check a list of objects (each with `colour`, `shape`, `x`) against a parsed prompt.

    Count prompt "N c s": count holds iff there are exactly N objects; colour / shape iff there is at least one
    object and all have colour c / shape s. Relation prompt "a A rel of a B": count iff exactly two objects; the
    other attributes are judged for the two distinct objects that best match A and B (see `_relation_result`),
    each sharing a colour or shape with its target; if there are no such two, they all fail.
    """
    if spec.kind == "count":
        want = spec.objects[0]
        return CheckResult(
            colour=bool(objects) and {o.colour for o in objects} == {want.colour},
            shape=bool(objects) and {o.shape for o in objects} == {want.shape},
            count=len(objects) == spec.count,
            position=None,
        )
    a, b = spec.objects
    candidates = [
        (_match(oa, a) + _match(ob, b), _relation_result(spec, objects, oa, ob))
        for oa, ob in permutations(objects, 2)
        if _match(oa, a) and _match(ob, b)
    ]
    if not candidates:
        return CheckResult(colour=False, shape=False, count=len(objects) == 2, position=False)
    # The best-matching pair stands for A and B; ties go to the most favourable result, compared by value so that
    # the answer does not depend on the order in which objects were found.
    return max(candidates, key=lambda c: (c[0], c[1].score, c[1].colour, c[1].shape, c[1].position))[1]
