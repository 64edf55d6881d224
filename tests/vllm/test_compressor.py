"""Decode-time recompression of several requests in one batch equals recompressing them one by one."""
import benchmark_modules
import pytest
import torch

from vllm_kvcompress.vllm import compressor

host = benchmark_modules.load("host_overhead")


def heads_content(ws, rid):
    """Every (layer, head)'s retained keys and values, in row order: {(l, h): (K, V)}."""
    st = ws.reqs[rid]
    out = {}
    for layer in range(ws.L):
        for head in range(ws.H):
            n = int(st.lens[layer, head])
            table = ws.tables[st.row, layer, head][None]
            out[layer, head] = tuple(compressor.reference.gather_heads(cache, table, n)[0] for cache in ws.pool)
    return out


@pytest.mark.parametrize("policy", ["snapkv", "adakv", "ems", "windowkv", "streamingllm"])
def test_recompressing_requests_together_equals_one_by_one(policy):
    together, alone = host.due_requests(policy, 40, num_requests=3), host.due_requests(policy, 40, num_requests=3)
    # one request falls due with fewer rows in a few heads (another length group) and one is not due
    for ws in (together, alone):
        ws.reqs["r1"].lens[0, :3] -= 5
        ws.reqs["r2"].decode_budget += 1000
    assert compressor.recompress_requests(together, ["r0", "r1", "r2"]) == ["r0", "r1"]
    assert [compressor.recompress_requests(alone, [rid]) for rid in ("r0", "r1", "r2")] == [["r0"], ["r1"], []]
    for rid in ("r0", "r1", "r2"):
        assert torch.equal(together.reqs[rid].lens, alone.reqs[rid].lens)
        got, want = heads_content(together, rid), heads_content(alone, rid)
        for key in want:
            torch.testing.assert_close(got[key], want[key], rtol=0, atol=0)
    assert (together.reqs["r0"].lens == together.reqs["r0"].decode_budget).all()
