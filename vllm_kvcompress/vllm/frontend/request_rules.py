"""What a request may change of the server's compression (the operator's rules, issue #17).

A request can override the server's policy, budget and any ``kv_compression_config`` option
(``vllm_xargs``), so without rules any client could ask for the most expensive scoring (EMS's global
score is quadratic in the prompt) or a budget that defeats the server's memory plan. The operator
says what is allowed (``--kv-request-overrides``, ``--kv-request-policies``, ``--kv-request-budget``,
or ``additional_config["kv_request_rules"]``); :meth:`RequestRules.refusal` compares a request's
effective config with the server's, so repeating a server value is never an override.

Defaults (safe for a shared server): a request may change its budget only, to one of the server
budget's kind (tokens or a fraction) and no larger: more compression, less memory. No other policy
(``none`` would keep the full cache), no other option. The offline ``LLM(...)`` is the exception:
the program that builds the engine writes every request itself, so there the default is ``all``.

Pure Python on top of :mod:`vllm_kvcompress.policies.config` (no vLLM import): parsed at start-up in the front end and
checked per request by :mod:`.params`.
"""
from __future__ import annotations

import json
from dataclasses import dataclass

from vllm_kvcompress.policies.budget import MAX_TOKENS, Budget
from vllm_kvcompress.policies.config import CompressionConfig, canonical_preset
from vllm_kvcompress.vllm.settings import RULES_KEY

KEY = RULES_KEY  # additional_config key (the CLI flags land there too)
MODES = ("off", "budget", "policy", "all")
DEFAULT_MODE = "budget"  # vllm serve, AsyncLLM: a shared server's clients are not the operator
TRUSTED_MODE = "all"  # offline LLM(...): the caller is the operator
FLAGS = {"overrides": "--kv-request-overrides", "policies": "--kv-request-policies",
         "budget": "--kv-request-budget"}  # rule -> its CLI flag (messages name the flag)
# the request fields a rule governs by name; every other changed field is an "option" (mode all only)
RULED_FIELDS = ("policy", "budget")
ANY_BUDGET = "any"


def _kind(budget: Budget) -> str:
    return "tokens" if budget.tokens is not None else "fraction"


def _value(budget: Budget) -> int | float:
    return budget.tokens if budget.tokens is not None else budget.fraction


def _amount(kind: str, value: int | float) -> str:
    return f"{value} tokens per head" if kind == "tokens" else f"{value:g} of the prompt"


def _text(end: int | float) -> str:
    """A range end as the flag takes it back: a fraction keeps its point (1.0, not 1 = one token)."""
    return repr(float(end)) if isinstance(end, float) else str(end)


# the widest range of each kind: every valid budget lies in it
WIDEST = {"tokens": (1, MAX_TOKENS), "fraction": (0.0, 1.0)}


@dataclass(frozen=True)
class BudgetRange:
    """The per-request budgets a server accepts, both ends inclusive: token counts in ``tokens``,
    fractions of the prompt in ``fraction``; None: budgets of that kind are refused (the front end
    does not know the prompt's length, so a token count cannot be compared with a fraction)."""

    tokens: tuple[int, int] | None = None
    fraction: tuple[float, float] | None = None

    @classmethod
    def parse(cls, text: str) -> "BudgetRange":
        """``LOW:HIGH[,LOW:HIGH]``, at most one range per kind (``16:256``, ``:0.1``, ``16:256,0.01:0.1``);
        an empty end is the kind's widest; ``any``: every budget."""
        if not isinstance(text, str):
            raise ValueError(f"{FLAGS['budget']} must be text such as '16:256' or '0.01:0.1', got {text!r}")
        if text.strip().lower() == ANY_BUDGET:
            return cls(**WIDEST)
        ranges: dict[str, tuple] = {}
        for part in text.split(","):
            low_text, colon, high_text = (s.strip() for s in part.partition(":"))
            if not colon:
                raise ValueError(f"{FLAGS['budget']}: {part.strip()!r} is not a range LOW:HIGH "
                                 f"(e.g. 16:256 tokens, :0.1 of the prompt, or {ANY_BUDGET})")
            try:
                ends = [Budget.parse(t) if t else None for t in (low_text, high_text)]
            except ValueError as error:
                raise ValueError(f"{FLAGS['budget']} {part.strip()!r}: {error}") from None
            kinds = {_kind(b) for b in ends if b is not None}
            if len(kinds) != 1:
                raise ValueError(f"{FLAGS['budget']} {part.strip()!r}: a range is token counts (16:256) or "
                                 "fractions of the prompt (0.01:0.1), with at least one end")
            kind = kinds.pop()
            if kind in ranges:
                raise ValueError(f"{FLAGS['budget']} {text!r}: two ranges of {kind}")
            low, high = (_value(b) if b is not None else widest for b, widest in zip(ends, WIDEST[kind]))
            if low > high:
                raise ValueError(f"{FLAGS['budget']} {part.strip()!r}: the low end is above the high end")
            ranges[kind] = (low, high)
        return cls(**ranges)

    @classmethod
    def up_to(cls, budget: Budget) -> "BudgetRange":
        """Budgets of ``budget``'s kind, no larger than it (the default: more compression only)."""
        kind = _kind(budget)
        return cls(**{kind: (WIDEST[kind][0], _value(budget))})

    def allows(self, budget: Budget) -> bool:
        bounds = getattr(self, _kind(budget))
        return bounds is not None and bounds[0] <= _value(budget) <= bounds[1]

    def __str__(self) -> str:
        """The flag's text for this range (empty ends where they are the widest)."""
        if self == BudgetRange(**WIDEST):
            return ANY_BUDGET
        parts = []
        for kind in WIDEST:
            bounds = getattr(self, kind)
            if bounds is not None:
                parts.append(":".join("" if end == widest else _text(end) for end, widest in zip(bounds, WIDEST[kind])))
        return ",".join(parts)

    def describe(self) -> str:
        """In words, for error messages: '1 to 256 tokens per head, or 0.01 to 0.1 of the prompt'."""
        words = []
        if self.tokens is not None:
            words.append(f"{self.tokens[0]} to {_amount('tokens', self.tokens[1])}")
        if self.fraction is not None:
            low, high = self.fraction
            words.append(("up to " if low == 0 else f"{low:g} to ") + _amount("fraction", high))
        return ", or ".join(words)


@dataclass(frozen=True)
class Refusal:
    """Why the rules refuse a request: ``reason`` (the metric's label: policy, budget or option),
    ``field`` (the CompressionConfig field the request changed) and ``message`` (for the client)."""

    reason: str
    field: str
    message: str


@dataclass(frozen=True)
class RequestRules:
    """``overrides``: what a request may change -- ``off`` nothing, ``budget`` its budget, ``policy``
    its budget and its policy (one of ``policies``), ``all`` anything but the server options (as
    before the rules existed). ``budget``: the budgets it may ask for (None: the default, which
    :meth:`budget_range` resolves against the server's config)."""

    overrides: str = DEFAULT_MODE
    policies: tuple[str, ...] = ()
    budget: BudgetRange | None = None

    def __post_init__(self) -> None:
        if self.overrides not in MODES:
            raise ValueError(f"unknown {FLAGS['overrides']} {self.overrides!r}; valid: {', '.join(MODES)}")
        if self.overrides == "policy" and not self.policies:
            raise ValueError(f"{FLAGS['overrides']} policy needs {FLAGS['policies']} LIST: the policies a "
                             "request may switch to")
        if self.overrides != "policy" and self.policies:
            raise ValueError(f"{FLAGS['policies']} applies with {FLAGS['overrides']} policy only "
                             f"(got {FLAGS['overrides']} {self.overrides})")
        if self.overrides == "off" and self.budget is not None:
            raise ValueError(f"{FLAGS['budget']} has no effect with {FLAGS['overrides']} off "
                             "(a request may not set its budget)")

    @classmethod
    def from_dict(cls, rules: dict, default_mode: str = DEFAULT_MODE) -> "RequestRules":
        """From ``{"overrides": MODE, "policies": "a,b" | [...], "budget": "LOW:HIGH"}`` (any subset;
        ``overrides`` absent: ``default_mode``); ValueError naming the problem (unknown keys, modes and
        policies list the valid ones)."""
        if not isinstance(rules, dict):
            raise ValueError(f"{KEY} must be a JSON object, got {type(rules).__name__}")
        unknown = sorted(set(rules) - set(FLAGS))
        if unknown:
            raise ValueError(f"unknown {KEY} key(s) {', '.join(map(str, unknown))}; valid keys: {', '.join(FLAGS)}")
        policies = rules.get("policies") or ()
        if isinstance(policies, str):
            policies = [p for p in policies.split(",") if p.strip()]
        if not isinstance(policies, (list, tuple)):
            raise ValueError(f"{FLAGS['policies']} must be a list of policies, got {policies!r}")
        try:
            canonical = tuple(dict.fromkeys(canonical_preset(p) for p in policies))
        except ValueError as error:
            raise ValueError(f"{FLAGS['policies']}: {error}") from None
        budget = rules.get("budget")
        return cls(overrides=rules.get("overrides") or default_mode, policies=canonical,
                   budget=BudgetRange.parse(budget) if budget is not None else None)

    def to_dict(self) -> dict:
        out = {"overrides": self.overrides, "policies": list(self.policies)}
        if self.budget is not None:
            out["budget"] = str(self.budget)
        return out

    def check_server(self, config: CompressionConfig) -> None:
        """ValueError when an allowed policy cannot run with the server's ``config`` (e.g. headkv
        without head scores: a request could not name them)."""
        for policy in self.policies:
            try:
                config.replace(policy=policy)
            except ValueError as error:
                raise ValueError(f"{FLAGS['policies']} allows {policy}, which cannot run with the server's "
                                 f"options: {error}") from None

    def budget_range(self, config: CompressionConfig) -> BudgetRange | None:
        """The budgets a request may ask for on a server of ``config`` (None: no budget override)."""
        if self.overrides == "off":
            return None
        if self.budget is not None:
            return self.budget
        return BudgetRange(**WIDEST) if self.overrides == "all" else BudgetRange.up_to(config.budget)

    def refusal(self, base: CompressionConfig, requested: CompressionConfig) -> Refusal | None:
        """Why a request whose effective config is ``requested`` may not run on a server of ``base``
        (None: it may). Only fields that differ from the server's count as overrides."""
        changed = [name for name in CompressionConfig.field_names() if getattr(requested, name) != getattr(base, name)]
        rule = f"{FLAGS['overrides']} {self.overrides}"
        if "policy" in changed and self.overrides not in ("policy", "all"):
            return Refusal("policy", "policy", f"this server does not let a request choose its policy ({rule}); "
                                               f"it compresses with {base.policy}")
        if "policy" in changed and self.overrides == "policy" and requested.policy not in self.policies:
            return Refusal("policy", "policy", f"policy {requested.policy!r} is not allowed on this server "
                                               f"({FLAGS['policies']} {','.join(self.policies)})")
        if "budget" in changed:
            allowed = self.budget_range(base)
            if allowed is None:
                return Refusal("budget", "budget", f"this server does not let a request set its budget ({rule})")
            if not allowed.allows(requested.budget):
                asked = _amount(_kind(requested.budget), _value(requested.budget))
                default = "" if self.budget is not None else ", the default: no more than the server's budget"
                return Refusal("budget", "budget", f"a budget of {asked} is outside what this server allows a "
                                                   f"request: {allowed.describe()} ({FLAGS['budget']} {allowed}{default})")
        options = [name for name in changed if name not in RULED_FIELDS]
        if options and self.overrides != "all":
            named = [_option_names(name, base, requested) for name in options]
            return Refusal("option", options[0], f"this server does not let a request set {', '.join(named)} "
                                                 f"({rule}; only {FLAGS['overrides']} all allows options)")
        return None

    def describe(self, config: CompressionConfig) -> str:
        """What a request may change, for the start-up log."""
        allowed = self.budget_range(config)
        budget = f"budget ({allowed.describe()})" if allowed is not None else None
        what = {"off": "nothing", "budget": budget, "policy": f"{budget} and policy ({', '.join(self.policies)})",
                "all": f"any option but the server options, {budget}"}[self.overrides]
        return f"a request may change {what} ({FLAGS['overrides']} {self.overrides})"


def _option_names(name: str, base: CompressionConfig, requested: CompressionConfig) -> str:
    """A changed field as the client wrote it: a part's options by option (``allocator_options.beta``)."""
    if not name.endswith("_options"):
        return name
    mine, theirs = getattr(base, name), getattr(requested, name)
    return ", ".join(f"{name}.{key}" for key in sorted(set(mine) | set(theirs)) if mine.get(key) != theirs.get(key))


def read(additional_config, config: CompressionConfig, offline: bool) -> RequestRules:
    """The rules of ``additional_config[KEY]`` (a dict or its JSON text), checked against the server's
    ``config``; absent: the defaults (``offline``: the caller writes every request, ``LLM(...)``)."""
    raw = additional_config.get(KEY) if isinstance(additional_config, dict) else None
    if isinstance(raw, str):
        try:
            raw = json.loads(raw)
        except json.JSONDecodeError as error:
            raise ValueError(f"{KEY} is not valid JSON: {error}") from None
    rules = RequestRules.from_dict({} if raw is None else raw, TRUSTED_MODE if offline else DEFAULT_MODE)
    rules.check_server(config)
    return rules
