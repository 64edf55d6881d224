"""``cuda_graphs``: pure-decode steps in persistent buffers (vllm_kvcompress/vllm/worker/graphs.py).

The CPU build of vLLM captures no CUDA graphs, but every pure-decode step with ``cuda_graphs`` on
takes the same path a captured graph replays (the same buffers, the same launches), so the engine
tests here check that path token for token against the HF oracle; the units check padding, what a
capture-time step writes, and the runner's refusal of full graphs while a request observes or a
head outgrows the graph tables (``cuda_graphs_max_len``).
"""
from types import SimpleNamespace

import pytest
import torch

from test_vllm_engine import generate_outputs, greedy, plugin_llm, prompt_ids, shutdown

from vllm_kvcompress.reference import hf
from vllm_kvcompress.policies.config import CompressionConfig
from vllm_kvcompress.policies.presets import build_policy
from vllm_kvcompress.vllm import runtime
from vllm_kvcompress.vllm.attention.backend import HeadBlockImpl, HeadBlockMetadataBuilder
from vllm_kvcompress.vllm.worker.graphs import DecodeBuffers
from vllm_kvcompress.vllm.worker.state import WorkerState, request_config

L, H, HQ, D, BS = 2, 2, 4, 16, 16


def buffers(rows=8, width=5, dtype=torch.float32):
    return DecodeBuffers.allocate(L, H, HQ, D, rows, width, dtype, "cpu")


def poison(buf: DecodeBuffers) -> None:
    for t in (buf.slots, buf.tables, buf.lens):
        t.fill_(7777)
    buf.queries.fill_(float("nan"))


@pytest.mark.parametrize("real, padded, width", [(3, 3, 5), (3, 8, 2), (1, 4, 5), (0, 6, 1)])
def test_fill_copies_the_layout_and_pads(real, padded, width):
    buf = buffers()
    poison(buf)
    gen = torch.Generator().manual_seed(real * 10 + padded)
    slots = torch.randint(0, 1000, (L, real, H), generator=gen)
    tables = torch.randint(1, 1000, (L, real, H, width), generator=gen, dtype=torch.int32)
    lens = torch.randint(1, width * BS, (L, real, H), generator=gen, dtype=torch.int32)
    got_slots, got_tables, got_lens = buf.fill(*((slots, tables, lens) if real else (None, None, None)), padded)
    assert got_slots.shape == (L, padded, H) and got_tables.shape == (L, padded, H, buf.width)
    assert got_slots.data_ptr() == buf.slots.data_ptr()  # views of the persistent buffers
    assert torch.equal(got_slots[:, :real], slots) and torch.equal(got_lens[:, :real], lens)
    assert torch.equal(got_tables[:, :real, :, :width], tables)
    assert (got_slots[:, real:] == -1).all() and (got_lens[:, real:] == 1).all()
    assert (got_tables[:, real:, :, 0] == 0).all()  # padded rows read vLLM's null block


def test_fill_refuses_what_does_not_fit():
    buf = buffers(rows=4, width=3)
    with pytest.raises(RuntimeError, match="does not fit"):
        buf.fill(None, None, None, 5)
    tables = torch.ones(L, 2, H, 4, dtype=torch.int32)
    with pytest.raises(RuntimeError, match="more than the 3 columns"):
        buf.fill(torch.zeros(L, 2, H, dtype=torch.int64), tables, torch.ones(L, 2, H, dtype=torch.int32), 2)


def test_a_capture_step_writes_no_cache_row_and_keeps_its_queries():
    """What vLLM captures (and warms up before): padded rows only. Nothing may land in the pool;
    the queries land in the step buffer (copied to the rings after the forward)."""
    ws = WorkerState(L, H, BS, {"l0": 0, "l1": 1}, CompressionConfig(policy="snapkv", cuda_graphs=True))
    ws.decode_buffers = buffers()
    poison(ws.decode_buffers)
    n = 5
    md = HeadBlockMetadataBuilder._graph_padding(ws, SimpleNamespace(num_reqs=n, num_actual_tokens=n))
    assert md.graph and not md.dummy and md.tables.shape == (L, n, H, 5)
    runtime.WORKER_STATE = ws
    try:
        impl = HeadBlockImpl(HQ, D, D ** -0.5, H, None, None, "auto")
        pool = torch.randn(2, 10, BS, D)
        before = pool.clone()
        query, key, value = torch.randn(n, HQ * D), torch.randn(n, H * D), torch.randn(n, H * D)
        output = torch.full((n, HQ * D), float("nan"))
        for layer in ("l0", "l1"):
            impl.layer = None
            impl.forward(SimpleNamespace(layer_name=layer), query, key, value, pool, md, output)
    finally:
        runtime.WORKER_STATE = None
    assert torch.equal(pool, before)
    assert torch.equal(ws.decode_buffers.queries[:, :n], query.view(n, HQ, D).expand(L, -1, -1, -1))
    assert torch.isfinite(output).all()  # padded rows attend to row 0 of block 0


def _read_layout(buf: DecodeBuffers, real: int, padded: int) -> tuple:
    """What a decode step's kernels read of the buffers: slots and lens of every row, and each real
    row's table columns up to its heads' blocks (the columns past them are never read)."""
    slots, tables, lens = buf.views(padded)
    read = torch.arange(buf.width, device=lens.device) < -(-lens[:, :real, :, None] // BS)
    return slots.clone(), lens.clone(), torch.where(read, tables[:, :real], -1)


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
def test_decode_steps_advance_in_place_as_a_full_layout_would(device):
    """Two worker states run the same steps: one lays each decode step out in full
    (``prepare_step`` + ``fill``), the other through ``lay_out_decode``, which advances the buffers in
    place while it can. Both must leave what the kernels read, the host counts and the requests'
    fields the same, across a compaction, a request joining, one finishing, a table widening and
    heads crossing into new blocks."""
    from vllm_kvcompress.vllm.worker import scheduled

    states = [WorkerState(L, H, BS, {"l0": 0, "l1": 1}, CompressionConfig(policy="snapkv", budget=8, window=4),
                          device=device) for _ in range(2)]
    for ws in states:
        ws.decode_buffers = DecodeBuffers.allocate(L, H, HQ, D, 8, 12, torch.float32, device)
        poison(ws.decode_buffers)

    def start(rid, prompt, first_block):
        for ws in states:
            ws.ingest(scheduled.scheduler_output([scheduled.new_request(rid, prompt, range(first_block, first_block + 90))]))
            ws.prepare_step([rid], [prompt])

    for i, (rid, prompt) in enumerate((("a", 30), ("b", 47), ("c", 16), ("e", 9), ("f", 5), ("g", 70),
                                       ("h", 12), ("i", 33))):
        start(rid, prompt, 1 + 100 * i)  # 8 requests: the next start grows the tables' rows
    running, advanced, padded = ["a", "b", "c"], 0, 5
    for step in range(60):
        if step == 12:  # a recompression: heads of many lengths, tail blocks back to spare
            for ws in states:
                ws.compacted_heads("b", torch.randint(3, 40, (L, H), generator=torch.Generator().manual_seed(5)))
        if step == 24:  # a request joins (its prefill ran in an earlier step): a new row order
            start("d", 21, 901)
            running = ["a", "d", "b", "c"]
        if step == 36:
            for ws in states:
                ws.ingest(scheduled.scheduler_output(finished=["a"]))
            running = ["d", "b", "c"]
        if step == 48:
            padded = 6
        full, fast = states
        held = fast.decode_buffers.held
        layout = full.prepare_step(running, [1] * len(running))
        full.decode_buffers.fill(layout.slots, layout.tables, layout.lens, padded)
        fast.lay_out_decode(running, {}, padded)
        advanced += held is not None and fast.decode_buffers.held is held
        for got, want in zip(_read_layout(fast.decode_buffers, len(running), padded),
                             _read_layout(full.decode_buffers, len(running), padded)):
            assert torch.equal(got, want), f"step {step}"
        assert torch.equal(fast.counts.lens, full.counts.lens) and torch.equal(fast.counts.blocks, full.counts.blocks)
        assert [(r.num_tokens, r.max_len, r.spare) for r in fast.reqs.values()] == \
               [(r.num_tokens, r.max_len, r.spare) for r in full.reqs.values()]
    assert 20 <= advanced < 60  # most steps advanced in place, the others were laid out anew


class _Base:
    @staticmethod
    def _is_uniform_decode(max_num_scheduled_tokens, uniform_decode_query_len, num_tokens, num_reqs,
                           force_uniform_decode=None):
        return num_tokens == num_reqs if force_uniform_decode is None else force_uniform_decode


def test_runner_refuses_full_graphs_when_the_state_does():
    from vllm_kvcompress.vllm.worker.worker import _HeadBlockRunnerMixin

    runner = type("Runner", (_HeadBlockRunnerMixin, _Base), {})()
    ask = dict(max_num_scheduled_tokens=1, uniform_decode_query_len=1, num_tokens=4, num_reqs=4)
    ws = SimpleNamespace(step_refuses_graphs=False)
    runtime.WORKER_STATE = ws
    try:
        assert runner._is_uniform_decode(**ask)
        ws.step_refuses_graphs = True
        assert not runner._is_uniform_decode(**ask)
        assert runner._is_uniform_decode(**ask, force_uniform_decode=True)  # capture: vLLM's own choice
    finally:
        runtime.WORKER_STATE = None


def test_cuda_graphs_is_a_server_option():
    base = CompressionConfig(policy="snapkv", cuda_graphs=True)
    for change in ({"cuda_graphs": False}, {"cuda_graphs_max_len": 4096}):
        with pytest.raises(ValueError, match="server option"):
            request_config(base, {"kv_compression_config": change})
    # repeating the server's value is no change (a request may carry a whole config)
    same = request_config(base, {"kv_compression_config": {**base.to_dict(), "budget": 0.2}})
    assert same.cuda_graphs and float(same.budget.fraction) == 0.2
    # null is the default ("where vLLM captures graphs"): a request carrying it keeps the server's
    assert request_config(base, {"kv_compression_config": {"cuda_graphs": None}}).cuda_graphs is True
    with pytest.raises(ValueError, match="true, false or null"):
        CompressionConfig(cuda_graphs="yes")
    with pytest.raises(ValueError, match="cuda_graphs_max_len"):
        CompressionConfig(cuda_graphs_max_len=0)


@pytest.mark.parametrize("held, observing, refused", [(47, False, False), (48, False, True), (10, True, True)])
def test_state_refuses_graphs_for_a_head_past_the_tables(held, observing, refused):
    """Tables of 3 blocks (48 rows): a decode step that would give a head its 49th row, or one in
    which a request still observes its prefill, must not replay a graph."""
    from vllm_kvcompress.vllm.worker import scheduled

    ws = WorkerState(L, H, BS, {"l0": 0, "l1": 1}, CompressionConfig(policy="snapkv", budget=8, window=4))
    ws.decode_buffers = buffers(width=3)
    ws.ingest(scheduled.scheduler_output([scheduled.new_request("a", 60, list(range(1, 25)))]))
    ws.prepare_step(["a"], [held])
    st = ws.reqs["a"]
    st.compress_at = held + (5 if observing else 0)  # observing: its prefill is not complete yet
    lens = torch.full((L, H), 3)
    lens[1, 0] = held
    ws.compacted_heads("a", lens)  # one head keeps all it had, the others 3 rows
    assert st.max_len == held
    ws.ingest(scheduled.scheduler_output(num_scheduled_tokens={"a": 1}))
    assert ws.step_refuses_graphs is refused


# ---- a CPU engine with cuda_graphs on, against the HF oracle ------------------------------------
STEP_TOKENS = 96
CONFIG = {"policy": "snapkv", "budget": 48, "window": 16, "decode_slack": 3, "cuda_graphs": True}
PRESETS = ("snapkv", "ems", "windowkv", "adakv")
DECODE_TOKENS = 20


@pytest.fixture(scope="module")
def graph_runs(tiny_model_dir, tmp_path_factory):
    """Per preset, tokens of four prompts decoded together (decode-time recompression every 4
    tokens); first, alone, a prompt of STEP_TOKENS + 1 tokens, whose last prefill chunk is a
    one-token step that must not take the decode path."""
    import json
    import os


    vocab = json.load(open(os.path.join(tiny_model_dir, "config.json")))["vocab_size"]
    prompts = [prompt_ids(n, 20 + i, vocab) for i, n in enumerate((STEP_TOKENS + 1, 150, 230, 310))]
    path = str(tmp_path_factory.mktemp("events") / "graphs.jsonl")
    llm = plugin_llm(tiny_model_dir, path, CONFIG, dtype="float32", enforce_eager=True, seed=0, max_model_len=512,
                     max_num_batched_tokens=STEP_TOKENS, max_num_seqs=4, gpu_memory_utilization=0.15)
    try:
        outputs = {}
        for preset in PRESETS:
            params = greedy(DECODE_TOKENS, {"kv_compression": preset})
            outputs[preset] = generate_outputs(llm, prompts[:1], params) + generate_outputs(llm, prompts[1:], params)
    finally:
        shutdown(llm)
    found = runtime.read_events(path)
    runs = {preset: list(zip([list(o.outputs[0].token_ids) for o in outs],
                             runtime.recompression_phases(found, [o.request_id for o in outs], CONFIG["decode_slack"])))
            for preset, outs in outputs.items()}
    return prompts, runs, found


def test_decode_steps_took_the_graph_path(graph_runs):
    _, _, found = graph_runs
    builds = [e for e in found if e["kind"] == "build"]
    graph = [e for e in builds if e["graph"]]
    assert len(graph) >= len(PRESETS) * DECODE_TOKENS  # every decode step of every preset
    assert all(e["fresh"] == 0 and e["chunks"] == 0 for e in graph)
    # eager (the CPU replays nothing): every graph step's layer-0 forward ran in Python, none capturing;
    # on a GPU, graph_check counts fewer of these than builds (the replayed steps)
    forwards = [e for e in found if e["kind"] == "graph_forward"]
    assert len(forwards) == len(graph) and not any(e["capturing"] for e in forwards)
    # the one-token last chunk of the first prompt observed (it was compressed at its end) outside
    assert any(not e["graph"] and e["tokens"] == 1 for e in builds)
    decoded = [e for e in found if e["kind"] == "compressed" and e["what"] == "decode"]
    assert len(decoded) >= len(PRESETS) * 4
    # between two recompressions, steps whose heads all had room advanced the buffers in place
    timed = [e for e in found if e["kind"] == "step_time" and e.get("graph")]
    assert any(e["in_place"] for e in timed) and not all(e["in_place"] for e in timed)


@pytest.mark.parametrize("preset", PRESETS)
def test_graph_path_matches_hf_oracle(preset, graph_runs, hf_model):
    prompts, runs, _ = graph_runs
    policy = build_policy(CompressionConfig.from_dict({**CONFIG, "policy": preset}))
    for prompt, (got, phase) in zip(prompts, runs[preset]):
        want = hf.generate(hf_model, torch.tensor(prompt), policy, max_new_tokens=DECODE_TOKENS,
                           recompress_slack=CONFIG["decode_slack"], recompress_phase=phase)
        assert want.recompressions > 0
        assert got == want.tokens, f"{preset}, prompt of {len(prompt)} tokens"


def test_heads_past_the_graph_tables_run_those_steps_without_graphs(tiny_model_dir, tmp_path, hf_model):
    """Budget 45, decode slack 6: heads hold 45..51 rows; tables of 3 blocks (cuda_graphs_max_len
    48) take the steps up to 48 rows, the others run without the buffers -- the same tokens as the
    HF oracle either way."""
    import json
    import os

    config = {**CONFIG, "budget": 45, "decode_slack": 6, "cuda_graphs_max_len": 48}
    vocab = json.load(open(os.path.join(tiny_model_dir, "config.json")))["vocab_size"]
    prompts = [prompt_ids(n, 40 + i, vocab) for i, n in enumerate((150, 230, 310))]
    path = str(tmp_path / "events.jsonl")
    llm = plugin_llm(tiny_model_dir, path, config, dtype="float32", enforce_eager=True, seed=0, max_model_len=512,
                     max_num_batched_tokens=512, max_num_seqs=4, gpu_memory_utilization=0.15)
    try:
        outs = generate_outputs(llm, prompts, greedy(DECODE_TOKENS, None))
    finally:
        shutdown(llm)
    found = runtime.read_events(path)
    decode_steps = [e for e in found if e["kind"] == "build" and e["tokens"] == e["rows"] == 3]
    assert {e["graph"] for e in decode_steps} == {True, False}
    policy = build_policy(CompressionConfig.from_dict(config))
    phases = runtime.recompression_phases(found, [o.request_id for o in outs], config["decode_slack"])
    for prompt, out, phase in zip(prompts, outs, phases):
        want = hf.generate(hf_model, torch.tensor(prompt), policy, max_new_tokens=DECODE_TOKENS,
                           recompress_slack=config["decode_slack"], recompress_phase=phase)
        assert list(out.outputs[0].token_ids) == want.tokens
