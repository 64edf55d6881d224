"""Triton compaction kernel vs reference.compact: bitwise, the whole pool (interpreter on CPU)."""
import pytest
import torch

from vllm_kvcompress.paged import reference
from vllm_kvcompress.triton_kernels.compaction import compact

ON_GPU = torch.cuda.is_available()
FP8 = torch.float8_e4m3fn


def keep_pattern(kind: str, old_len: int, gen: torch.Generator) -> torch.Tensor:
    """Strictly increasing kept row indices of one head, in [0, old_len)."""
    rows = torch.arange(old_len)
    if kind == "identity":
        return rows
    if kind == "every_other":
        return rows[1::2]
    if kind == "prefix_sparse_tail":  # dense prefix, then every 7th row
        cut = old_len // 2
        return torch.cat([rows[:cut], rows[cut::7]])
    if kind == "single_first":
        return rows[:1]
    if kind == "single_last":
        return rows[-1:]
    if kind == "none":
        return rows[:0]
    if kind == "tail":  # the last third: every row moves far
        return rows[old_len - old_len // 3 :]
    n = int(torch.randint(1, old_len + 1, (), generator=gen))
    return torch.randperm(old_len, generator=gen)[:n].sort().values


PATTERNS = ["identity", "every_other", "prefix_sparse_tail", "single_first", "single_last", "none",
            "tail", "random", "random"]


def random_pool(shape: tuple[int, ...], dtype: torch.dtype, gen: torch.Generator) -> torch.Tensor:
    """Random cache rows; an fp8 pool holds random bytes, NaN codes too: rows move as bytes, never as values."""
    if dtype == FP8:
        return torch.randint(0, 256, shape, generator=gen, dtype=torch.uint8).view(FP8)
    return torch.randn(shape, generator=gen).to(dtype)


def make_case(num_heads, max_blocks, block_size, head_dim, dtype, idx_dtype, device, seed):
    """A pool with spare blocks no head owns, shuffled block ids, one keep pattern per head."""
    gen = torch.Generator().manual_seed(seed)
    num_blocks = num_heads * max_blocks + 11
    key_cache = random_pool((num_blocks, block_size, head_dim), dtype, gen)
    value_cache = random_pool((num_blocks, block_size, head_dim), dtype, gen)
    table = torch.randperm(num_blocks, generator=gen)[: num_heads * max_blocks].view(num_heads, max_blocks)
    old_len = torch.randint(1, max_blocks * block_size + 1, (num_heads,), generator=gen)
    old_len[0] = max_blocks * block_size  # one head with full blocks
    keep_idx = torch.randint(0, 1000, (num_heads, max_blocks * block_size), generator=gen)  # padding
    keep_len = torch.zeros(num_heads, dtype=torch.long)
    for h in range(num_heads):
        kept = keep_pattern(PATTERNS[h % len(PATTERNS)], int(old_len[h]), gen)
        keep_idx[h, : len(kept)] = kept
        keep_len[h] = len(kept)
    to = lambda t: t.to(device)  # noqa: E731
    return (to(key_cache), to(value_cache), to(table.int()), to(keep_idx.to(idx_dtype)),
            to(keep_len.int()), to(old_len.int()))


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.cpu().view({1: torch.int8, 2: torch.int16, 4: torch.int32}[t.element_size()])


def check(case, **kwargs):
    expected = [t.cpu().clone() for t in case]
    freed_ref = reference.compact(*expected)
    freed = compact(*case, **kwargs)
    assert torch.equal(bits(case[0]), bits(expected[0]))  # every block, owned or spare
    assert torch.equal(bits(case[1]), bits(expected[1]))
    assert len(freed) == len(freed_ref)
    for got, want in zip(freed, freed_ref):
        assert got.dtype == torch.int64 and torch.equal(got.cpu(), want)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, FP8], ids=str)
@pytest.mark.parametrize("head_dim", [64, 128])
def test_compact_patterns(device, dtype, head_dim):
    # block_rows=8 on CPU: several chunks per head even at interpreter-friendly sizes.
    max_blocks = 40 if ON_GPU else 3
    case = make_case(len(PATTERNS), max_blocks, 16, head_dim, dtype, torch.int64, device, seed=head_dim)
    check(case, **({} if ON_GPU else {"block_rows": 8}))


@pytest.mark.parametrize("block_size,idx_dtype", [(8, torch.int32), (5, torch.int64)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, FP8], ids=str)
def test_compact_block_sizes(device, block_size, idx_dtype, dtype):
    case = make_case(len(PATTERNS), 7, block_size, 64, dtype, idx_dtype, device, seed=block_size)
    check(case, block_rows=16)


@pytest.mark.skipif(not ON_GPU, reason="many heads in flight: GPU only")
@pytest.mark.parametrize("block_rows", [32, 128, 256])
def test_compact_many_heads(device, block_rows):
    check(make_case(300, 64, 16, 128, torch.bfloat16, torch.int64, device, seed=block_rows),
          block_rows=block_rows)


def test_compact_no_heads(device):
    case = make_case(1, 2, 16, 64, torch.float32, torch.int64, device, seed=0)
    empty = (case[0], case[1], case[2][:0], case[3][:0], case[4][:0], case[5][:0])
    before = case[0].clone()
    assert compact(*empty) == []
    assert torch.equal(case[0], before)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, FP8], ids=str)
@pytest.mark.parametrize("impl", ["reference", "dispatch"])
def test_compact_rows_equals_compact(device, dtype, impl):
    """compact_rows (no freed ids, nothing read back): the same pool as reference.compact, bitwise;
    the vectorised reference on the CPU, the kernel on a GPU through the dispatcher."""
    from vllm_kvcompress.paged import compaction

    case = make_case(len(PATTERNS), 3, 16, 64, dtype, torch.int64, device, seed=7)
    expected = [t.cpu().clone() for t in case]
    reference.compact(*expected)
    rows = reference.compact_rows if impl == "reference" else compaction.compact_rows
    if impl == "reference":
        case = [t.cpu() for t in case]
    rows(*case[:5])
    assert torch.equal(bits(case[0]), bits(expected[0])) and torch.equal(bits(case[1]), bits(expected[1]))
