"""The kernels a recompression tick or a prefill step launches compile once per configuration, not
once per size: Triton specializes integer arguments on being 1 or a multiple of 16 unless told
not to (``do_not_specialize``), and a tick's calls vary their widths, head counts and table
strides. The first full tick of a served EMS window on an H100 took 6 s, after a warm-up tick of
one request had compiled every kernel once: compiles for other sizes would explain it. Pointers
are specialized on 16-byte alignment too, and per-head indices are views into a step's packed
upload at any offset (``do_not_specialize_on_alignment``).

Native only: Triton's interpreter compiles nothing."""
import pytest
import torch

from vllm_kvcompress.triton_kernels.column_mass import _column_mass_kernel, _row_lse_kernel, column_mass
from vllm_kvcompress.triton_kernels.gather_rows import _gather_padded_kernel, gather_heads_padded
from vllm_kvcompress.triton_kernels.merge import _merge_kernel, merge_kv_by_class
from vllm_kvcompress.triton_kernels.paged_window_scores import _paged_window_scores_kernel, paged_window_scores
from vllm_kvcompress.triton_kernels.write_tokens import _write_tokens_kernel, write_tokens

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="Triton's interpreter compiles nothing")

# widths that are a multiple of 16 or not, with the same block sizes (the launchers' constexprs)
SIZES = (32, 37, 48, 53)


def compiled(kernel) -> int:
    """Binaries of ``kernel`` compiled for this device so far."""
    return len(kernel.device_caches[torch.cuda.current_device()][0])


def merge_at(width: int) -> None:
    key, value = (torch.randn(3, width, 64, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    weight = torch.rand(3, width, device="cuda") + 0.5
    classes = max(1, width // 2)
    assign = torch.randint(0, classes + 1, (3, width), device="cuda")
    merge_kv_by_class(key, value, weight, assign, classes, out_dtype=torch.bfloat16)


def write_at(width: int) -> None:
    tokens = 64 + width  # rows enough that the launcher's BLOCK_R is at its cap (a constexpr of its own below)
    cache = torch.zeros(64, 16, 2, 64, device="cuda", dtype=torch.bfloat16)
    rows = torch.randn(tokens, 2, 64, device="cuda", dtype=torch.bfloat16)
    slots = torch.randperm(64 * 16, device="cuda")[: tokens * 2].view(2, tokens).T  # strided: [tokens, 2]
    write_tokens(rows, rows, slots, cache[:, :, 0], cache[:, :, 1])  # K and V interleaved in one tensor


def packed(values: list[int], width: int) -> torch.Tensor:
    """``values`` as int64 on the GPU at an offset that varies with ``width``: a view into one packed
    upload, as the worker's per-head indices are (:meth:`WorkerState.upload`), aligned or not."""
    return torch.tensor([0] * (width % 3) + values, device="cuda")[width % 3:]


def scores_at(width: int) -> None:
    lengths = [width, max(1, width - 5), 3]
    blocks = -(-width // 16)
    key_cache = torch.randn(3 * blocks + 1, 16, 64, device="cuda", dtype=torch.bfloat16)
    table = torch.arange(3 * blocks, device="cuda", dtype=torch.int32).view(3, blocks)
    queries = torch.randn(3, 4, 8, 64, device="cuda", dtype=torch.bfloat16)
    paged_window_scores(queries, key_cache, table, packed(lengths, width), width)


def gather_at(width: int) -> None:
    """A tick's dense copy of its heads, lengths at any offset of the step's packed upload."""
    lengths = [width, max(1, width - 5), 3]
    blocks = -(-width // 16)
    key_cache = torch.randn(3 * blocks + 1, 16, 64, device="cuda", dtype=torch.bfloat16)
    table = torch.arange(3 * blocks, device="cuda", dtype=torch.int32).view(3, blocks)
    gather_heads_padded(key_cache, key_cache, table, packed(lengths, width), width)


def chunk_mass_at(width: int) -> None:
    """EMS's column mass of a continued prefill chunk: its queries over the keys so far."""
    query = torch.randn(8, 200, 64, device="cuda", dtype=torch.bfloat16)[:, :width]
    key = torch.randn(2, 200 + width, 64, device="cuda", dtype=torch.bfloat16)
    column_mass(query, key, start=200)


@pytest.mark.parametrize("launch,kernel", [
    (merge_at, _merge_kernel), (write_at, _write_tokens_kernel), (scores_at, _paged_window_scores_kernel),
    (chunk_mass_at, _row_lse_kernel), (chunk_mass_at, _column_mass_kernel), (gather_at, _gather_padded_kernel),
], ids=["merge", "write", "scores", "row_lse", "column_mass", "gather"])
def test_a_kernel_compiles_once_whatever_the_sizes(launch, kernel):
    launch(SIZES[0])
    first = compiled(kernel)
    for width in SIZES[1:]:
        launch(width)
    torch.cuda.synchronize()
    assert compiled(kernel) == first, f"{kernel.fn.__name__} compiled again for other sizes"

