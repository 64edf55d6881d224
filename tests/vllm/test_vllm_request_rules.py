"""The operator's rules for per-request compression options (issue #17, ``request_rules.py``).

Without a server: budget ranges, the rules' own validation, every rule against requests through
``params.check_request`` (what the front end's ``validate_params`` runs), the refusal counter, and
where the rules come from at start-up. With one server (``slow``, ~2-4 min on 2 cores): the
defaults through the OpenAI API of ``vllm serve --api-server-count 2`` (refusals, what is still
served, both processes, /metrics).
"""
import os
import re
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest
from kvc_server import PLUGIN_FLAGS, start_server
from prometheus_client import REGISTRY

from vllm_kvcompress.policies.budget import Budget
from vllm_kvcompress.policies.config import CompressionConfig
from vllm_kvcompress.tools.models import TINY_SENTENCES
from vllm_kvcompress.tools.openai_server import metric, write_chat_template
from vllm_kvcompress.vllm.scheduler import metrics
from vllm_kvcompress.vllm.frontend import params
from vllm_kvcompress.vllm.frontend.request_rules import BudgetRange, RequestRules

TOKEN_SERVER = CompressionConfig(policy="snapkv", budget=32)
FRACTION_SERVER = CompressionConfig(policy="snapkv", budget=0.1)


# ---- budget ranges ---------------------------------------------------------------------------------
@pytest.mark.parametrize("text, printed, inside, outside", [
    ("16:256", "16:256", [16, 100, 256], [15, 257, 0.5]),
    (":0.1", ":0.1", [0.01, 0.1], [0.11, 1.0, 8]),
    ("16:256,0.01:0.1", "16:256,0.01:0.1", [16, 0.05], [8, 0.2]),
    ("16:", "16:", [16, 1 << 20], [15, 0.5]),
    ("any", "any", [1, 1 << 24, 0.001, 1.0], []),
    ("1.0:1.0", "1.0:", [1.0], [1, 0.99]),  # a fraction keeps its point when printed back
])
def test_budget_range_parses_and_prints_back(text, printed, inside, outside):
    allowed = BudgetRange.parse(text)
    assert str(allowed) == printed and BudgetRange.parse(printed) == allowed
    assert all(allowed.allows(Budget.parse(b)) for b in inside)
    assert not any(allowed.allows(Budget.parse(b)) for b in outside)


@pytest.mark.parametrize("text, message", [
    (":", "with at least one end"),
    ("16:0.1", "token counts (16:256) or fractions"),
    ("lots", "is not a range LOW:HIGH"),
    ("0:5", "budget must be a positive number"),
    ("64:16", "the low end is above the high end"),
    ("1:2,3:4", "two ranges of tokens"),
    (256, "must be text"),
])
def test_bad_budget_range_is_refused(text, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        BudgetRange.parse(text)


@pytest.mark.parametrize("rules, message", [
    ({"overrides": "some"}, "unknown --kv-request-overrides 'some'; valid: off, budget, policy, all"),
    ({"overrides": "policy"}, "--kv-request-overrides policy needs --kv-request-policies"),
    ({"policies": "snapkv"}, "--kv-request-policies applies with --kv-request-overrides policy only"),
    ({"overrides": "all", "policies": "snapkv"}, "applies with --kv-request-overrides policy only"),
    ({"overrides": "off", "budget": "1:8"}, "--kv-request-budget has no effect with --kv-request-overrides off"),
    ({"overrides": "policy", "policies": "snapkv,nosuch"},
     "--kv-request-policies: unknown kv-compression policy 'nosuch'; valid policies: none, streamingllm"),
    ({"overrides": "policy", "policies": 5}, "must be a list of policies"),
    ({"budgte": "1:8"}, "unknown kv_request_rules key(s) budgte; valid keys: overrides, policies, budget"),
])
def test_bad_rules_name_the_problem(rules, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        RequestRules.from_dict(rules)


def test_an_allowed_policy_must_run_with_the_server_options():
    rules = RequestRules.from_dict({"overrides": "policy", "policies": ["streamingllm", "headkv"]})
    with pytest.raises(ValueError, match="allows headkv, which cannot run with the server's options: .*head scores"):
        rules.check_server(TOKEN_SERVER)  # a request could not name the scores file


# ---- the rules against requests (what validate_params runs) ------------------------------------------
def refused_count(reason: str) -> float:
    return REGISTRY.get_sample_value(f"{metrics.REFUSED}_total", {"reason": reason}) or 0.0


OK = None
DEFAULT, OFF, ALL = {}, {"overrides": "off"}, {"overrides": "all"}
POLICY = {"overrides": "policy", "policies": "streamingllm,pyramidkv"}
CASES = [
    # (rules, server, vllm_xargs, None = allowed | (reason, param, part of the message))
    (DEFAULT, TOKEN_SERVER, {"kv_budget": 16}, OK),  # more compression: allowed
    (DEFAULT, TOKEN_SERVER, {"kv_budget": 32, "kv_compression": "snapkv"}, OK),  # the server's own values
    (DEFAULT, TOKEN_SERVER, {"kv_compression_config": '{"budget": 8}'}, OK),  # the budget rule, by any key
    (DEFAULT, TOKEN_SERVER, {"kv_budget": 33}, ("budget", "kv_budget",
     "a budget of 33 tokens per head is outside what this server allows a request: 1 to 32 tokens per head "
     "(--kv-request-budget :32, the default: no more than the server's budget)")),
    (DEFAULT, TOKEN_SERVER, {"kv_budget": 0.5}, ("budget", "kv_budget", "a budget of 0.5 of the prompt is outside")),
    (DEFAULT, FRACTION_SERVER, {"kv_budget": 0.05}, OK),
    (DEFAULT, FRACTION_SERVER, {"kv_budget": 8}, ("budget", "kv_budget", "allows a request: up to 0.1 of the prompt")),
    (DEFAULT, TOKEN_SERVER, {"kv_compression": "ems"}, ("policy", "kv_compression",
     "this server does not let a request choose its policy (--kv-request-overrides budget); it compresses with snapkv")),
    (DEFAULT, TOKEN_SERVER, {"kv_compression": "none"}, ("policy", "kv_compression", "choose its policy")),
    (DEFAULT, TOKEN_SERVER, {"kv_compression_config": '{"policy": "full"}'},
     ("policy", "kv_compression_config", "choose its policy")),
    (DEFAULT, TOKEN_SERVER, {"kv_compression_config": '{"window": 8, "sink": 100}'}, ("option", "kv_compression_config",
     "this server does not let a request set window, sink (--kv-request-overrides budget; "
     "only --kv-request-overrides all allows options)")),
    (DEFAULT, TOKEN_SERVER, {"kv_compression_config": '{"headkv_scores": "/no/such.json"}'},
     ("option", "kv_compression_config", "set headkv_scores")),  # refused before the file is looked for
    (DEFAULT, TOKEN_SERVER, {"kv_budget": "abc"}, ("invalid", "kv_budget", "budget must be a token count")),
    (OFF, TOKEN_SERVER, {"kv_compression": "snapkv", "kv_budget": 32}, OK),
    (OFF, TOKEN_SERVER, {"kv_budget": 16}, ("budget", "kv_budget",
     "this server does not let a request set its budget (--kv-request-overrides off)")),
    (POLICY, TOKEN_SERVER, {"kv_compression": "streamingllm", "kv_budget": 16}, OK),
    (POLICY, TOKEN_SERVER, {"kv_compression": "ems"}, ("policy", "kv_compression",
     "policy 'ems' is not allowed on this server (--kv-request-policies streamingllm,pyramidkv)")),
    (POLICY, TOKEN_SERVER, {"kv_compression": "pyramidkv", "kv_budget": 64}, ("budget", "kv_budget", "1 to 32 tokens")),
    (POLICY, TOKEN_SERVER, {"kv_compression": "pyramidkv", "kv_compression_config": '{"pyramid_beta": 5}'},
     ("option", "kv_compression_config", "set allocator_options.beta")),  # a legacy key: the option it sets
    (POLICY, TOKEN_SERVER, {"kv_compression": "pyramidkv", "kv_compression_config": '{"allocator_options": {"beta": 5}}'},
     ("option", "kv_compression_config", "set allocator_options.beta")),
    ({**POLICY, "budget": "8:64,0.05:0.2"}, TOKEN_SERVER, {"kv_budget": 64}, OK),
    ({**POLICY, "budget": "8:64,0.05:0.2"}, TOKEN_SERVER, {"kv_budget": 0.25}, ("budget", "kv_budget",
     "8 to 64 tokens per head, or 0.05 to 0.2 of the prompt (--kv-request-budget 8:64,0.05:0.2)")),
    (ALL, TOKEN_SERVER, {"kv_compression": "none", "kv_budget": 1.0, "kv_compression_config": '{"decode_slack": null}'},
     OK),
    ({**ALL, "budget": ":64"}, TOKEN_SERVER, {"kv_budget": 65}, ("budget", "kv_budget", "(--kv-request-budget :64)")),
    (ALL, TOKEN_SERVER, {"kv_compression_config": '{"cuda_graphs": true}'},
     ("invalid", "kv_compression_config", "cuda_graphs is a server option")),  # never a request's
    (ALL, TOKEN_SERVER, {"kv_compression_config": '{"headkv_scores": "/no/such.json", "policy": "headkv"}'},
     ("invalid", "kv_compression_config", "does not exist")),  # allowed by the rules: the file is looked for
]


@pytest.mark.parametrize("rules, server, xargs, expected", CASES,
                         ids=[f"{r.get('overrides', 'default')}-{x}" for r, _, x, _ in CASES])
def test_rules_decide_each_request(rules, server, xargs, expected):
    checked = RequestRules.from_dict(rules)
    checked.check_server(server)
    if expected is OK:
        config = params.check_request(dict(xargs), server, checked)
        assert config is not None
        return
    reason, param, message = expected
    before = refused_count(reason)
    with pytest.raises(params.VLLMValidationError) as refused:
        params.check_request(dict(xargs), server, checked)
    assert message in str(refused.value)
    assert refused.value.parameter == f"vllm_xargs.{param}"
    assert refused_count(reason) == before + 1  # counted once, under its reason


def test_check_request_applies_the_default_rules_unless_told():
    """Every caller of check_request gets the safe defaults when it passes no rules."""
    with pytest.raises(params.VLLMValidationError, match="choose its policy"):
        params.check_request({"kv_compression": "ems"}, TOKEN_SERVER)
    assert params.check_request({"kv_compression": "ems"}, TOKEN_SERVER, RequestRules(overrides="all")).policy == "ems"


def test_refusal_reasons_are_listed_before_the_first_refusal():
    counter = metrics.refused_requests()
    names = {sample.labels["reason"] for family in counter.collect() for sample in family.samples
             if sample.name.endswith("_total")}
    assert names == set(metrics.REFUSAL_REASONS)


# ---- start-up: where the rules come from, and what reaches the validator ------------------------------
@pytest.fixture
def published(monkeypatch):
    """The environment the validator reads, restored after the test."""
    for name in (params.CONFIG_ENV, params.RULES_ENV):
        monkeypatch.setenv(name, "")
    return lambda: params.server_rules().to_dict()


def tiny_engine_args(tiny_model_dir, rules=None, **options):
    from vllm.engine.arg_utils import EngineArgs

    extra = {"kv_compression": {"policy": "snapkv", "budget": 32, **options}}
    if rules is not None:
        extra["kv_request_rules"] = rules
    return EngineArgs(model=tiny_model_dir, dtype="float32", enforce_eager=True, additional_config=extra)


@pytest.mark.parametrize("usage, rules, expected", [
    ("OPENAI_API_SERVER", None, {"overrides": "budget", "policies": []}),  # a server: the safe default
    ("ENGINE_CONTEXT", None, {"overrides": "budget", "policies": []}),  # AsyncLLM: a server of its own
    ("LLM_CLASS", None, {"overrides": "all", "policies": []}),  # offline: the caller writes the requests
    ("LLM_CLASS", {"overrides": "policy", "policies": ["streamingllm"], "budget": "8:32"},
     {"overrides": "policy", "policies": ["streamingllm"], "budget": "8:32"}),
    ("LLM_CLASS", '{"budget": ":16"}', {"overrides": "all", "policies": [], "budget": ":16"}),  # JSON text too
])
def test_create_engine_config_publishes_the_rules(published, tiny_model_dir, usage, rules, expected):
    from vllm.usage.usage_lib import UsageContext

    tiny_engine_args(tiny_model_dir, rules).create_engine_config(UsageContext[usage])
    assert published() == expected


@pytest.mark.parametrize("rules, message", [
    ({"overrides": "policy", "policies": ["headkv"]}, "allows headkv, which cannot run with the server's options"),
    ({"overrides": "policy"}, "needs --kv-request-policies"),
    ("{overrides", "kv_request_rules is not valid JSON"),
])
def test_bad_rules_fail_in_create_engine_config(published, tiny_model_dir, rules, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        tiny_engine_args(tiny_model_dir, rules).create_engine_config()


def test_rules_without_compression_are_refused(tiny_model_dir):
    from vllm.engine.arg_utils import EngineArgs

    for compression in ({}, {"kv_compression": {"policy": "none"}}):
        args = EngineArgs(model=tiny_model_dir, additional_config={**compression, "kv_request_rules": {"overrides": "all"}})
        with pytest.raises(ValueError, match="they need compression on"):
            args.create_engine_config()


@pytest.mark.parametrize("api_processes", [2, 1])
def test_api_server_process_gets_the_flags_back(published, monkeypatch, tiny_model_dir, api_processes):
    """What an API-server process of ``--api-server-count 2`` does: vLLM's unwrapped from_cli_args
    (plugins not loaded yet) drops our flags; create_engine_config puts back what the parent's
    from_cli_args left in the environment. A single front end (or a plain LLM) is left as it is."""
    from vllm.engine.arg_utils import AsyncEngineArgs, EngineArgs
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    from vllm_kvcompress.vllm import patches

    monkeypatch.delenv(patches.CLI_ENV, raising=False)
    parser = AsyncEngineArgs.add_cli_args(FlexibleArgumentParser())
    parent = parser.parse_args(["--model", tiny_model_dir, "--kv-compression", "snapkv", "--kv-budget", "32",
                                "--kv-request-overrides", "off"])
    AsyncEngineArgs.from_cli_args(parent)  # the parent: leaves the flags in the environment
    child = patches.ORIGINALS["from_cli_args"](AsyncEngineArgs, parent)  # what the spawned process gets
    assert "kv_compression" not in (child.additional_config or {})
    child.dtype, child.enforce_eager, child._api_process_count = "float32", True, api_processes
    config = child.create_engine_config()
    if api_processes == 1:
        assert config.kv_transfer_config is None
        return
    assert config.additional_config["kv_compression"]["budget"] == 32
    assert params.PROCESSOR in config.model_config.logits_processors  # its requests are validated
    assert config.kv_transfer_config is not None  # and its /metrics has the compression metrics
    assert published()["overrides"] == "off"
    # a plain server's from_cli_args clears what an earlier one left
    AsyncEngineArgs.from_cli_args(parser.parse_args(["--model", tiny_model_dir]))
    assert patches.CLI_ENV not in os.environ
    plain = EngineArgs(model=tiny_model_dir, dtype="float32", enforce_eager=True)
    plain._api_process_count = 2
    assert plain.create_engine_config().kv_transfer_config is None


# ---- through the OpenAI server: the defaults, two API-server processes ----------------------------------
SERVE = [sys.executable, "-m", "vllm_kvcompress.tools.vllm_cli", "serve"]  # the CLI's serve, for --api-server-count
API_SERVERS = 2
SENDS = 3  # each refused request 3 times, each on a connection of its own
PROMPT = " ".join(TINY_SENTENCES * 3)  # ~160 tokens, longer than the budget
REFUSED_OVER_HTTP = [  # on the defaults of a snapkv server at budget 32
    ({"kv_compression": "ems"}, "policy", "vllm_xargs.kv_compression",
     "does not let a request choose its policy (--kv-request-overrides budget); it compresses with snapkv"),
    ({"kv_compression": "none"}, "policy", "vllm_xargs.kv_compression", "choose its policy"),
    ({"kv_budget": 64}, "budget", "vllm_xargs.kv_budget",
     "a budget of 64 tokens per head is outside what this server allows a request: 1 to 32 tokens per head "
     "(--kv-request-budget :32, the default: no more than the server's budget)"),
    ({"kv_budget": 0.5}, "budget", "vllm_xargs.kv_budget", "a budget of 0.5 of the prompt is outside"),
    ({"kv_compression_config": '{"window": 8}'}, "option", "vllm_xargs.kv_compression_config",
     "does not let a request set window"),
    ({"kv_budget": 0}, "invalid", "vllm_xargs.kv_budget", "budget must be a positive number"),
]
ALLOWED_OVER_HTTP = [{"kv_budget": 16}, {"kv_compression": "snapkv", "kv_budget": 32}]
MAX_TOKENS = 4


RULES_LINE = "kv compression: a request may change budget (1 to 32 tokens per head) (--kv-request-overrides budget)"


def refused_totals(text: str) -> dict:
    """{reason: vllm:kv_compression_refused_requests_total of that reason} from /metrics text."""
    return {reason: metric(text, f'{metrics.REFUSED}_total{{reason="{reason}"}}') or 0.0
            for reason in metrics.REFUSAL_REASONS}


@pytest.fixture(scope="module")
def rules_run(tiny_model_dir, tmp_path_factory):
    """A server on the default rules (snapkv, budget 32) with two API-server processes: every refused
    request SENDS times, the allowed ones, one refused chat; /metrics before and after; its log."""
    log = str(tmp_path_factory.mktemp("logs") / "rules.log")
    template = write_chat_template(tmp_path_factory.mktemp("template"))
    server = start_server(tiny_model_dir, [*PLUGIN_FLAGS, "--api-server-count", str(API_SERVERS)], log, template,
                          command=SERVE)
    try:
        before = server.metrics()
        body = {"prompt": PROMPT, "max_tokens": MAX_TOKENS, "temperature": 0.0, "ignore_eos": True}
        cases = [case for case in REFUSED_OVER_HTTP for _ in range(SENDS)]
        with ThreadPoolExecutor(len(REFUSED_OVER_HTTP)) as pool:  # at once: both processes may take some
            refused = list(zip(cases, pool.map(lambda case: server.post("completions", {**body, "vllm_xargs": case[0]}),
                                               cases)))
        allowed = [server.post("completions", {**body, "vllm_xargs": xargs}) for xargs in ALLOWED_OVER_HTTP]
        chat = server.post("chat/completions", {"messages": [{"role": "user", "content": PROMPT}],
                                                "max_tokens": MAX_TOKENS, "vllm_xargs": {"kv_compression": "ems"}})
        after = server.metrics()
        alive = server.alive() and server.post("completions", body).status_code == 200
    finally:
        server.stop()
    return {"before": before, "refused": refused, "allowed": allowed, "chat": chat, "after": after,
            "alive": alive, "log": open(log, errors="replace").read()}


@pytest.mark.slow
def test_refused_overrides_answer_400_naming_the_rule(rules_run):
    for (xargs, _, param, message), response in rules_run["refused"]:
        assert response.status_code == 400, (xargs, response.text)
        error = response.json()["error"]
        assert message in error["message"] and error["param"] == param, (xargs, error)
    chat = rules_run["chat"]
    assert chat.status_code == 400 and "choose its policy" in chat.json()["error"]["message"], chat.text


@pytest.mark.slow
def test_allowed_overrides_are_served(rules_run):
    for xargs, response in zip(ALLOWED_OVER_HTTP, rules_run["allowed"]):
        assert response.status_code == 200, (xargs, response.text)
        assert response.json()["usage"]["completion_tokens"] == MAX_TOKENS
    assert rules_run["alive"]  # and the server kept serving after the refusals


@pytest.mark.slow
def test_every_api_server_process_has_the_rules(rules_run):
    """Each API-server process logged the rules it validates with (which process accepts a
    connection is the kernel's choice, so the requests alone cannot show that both have them)."""
    having = {line.split(" ", 1)[0].lstrip("(") for line in rules_run["log"].splitlines()
              if RULES_LINE in line}
    assert having >= {f"ApiServer_{i}" for i in range(API_SERVERS)}, having


@pytest.mark.slow
def test_metrics_count_refusals_by_reason(rules_run):
    """/metrics (summed over both API-server processes) lists every reason from the start and counts
    each refused request once, under its reason."""
    assert refused_totals(rules_run["before"]) == dict.fromkeys(metrics.REFUSAL_REASONS, 0.0)
    expected = dict.fromkeys(metrics.REFUSAL_REASONS, 0.0)
    for _, reason, _, _ in REFUSED_OVER_HTTP:
        expected[reason] += SENDS
    expected["policy"] += 1  # the chat request
    assert refused_totals(rules_run["after"]) == expected
