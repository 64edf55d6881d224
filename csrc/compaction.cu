// In-place compaction of each head's kept rows to the front of its own head-blocks (CUDA).
//
// Semantics: vllm_kvcompress.paged.reference.compact; the same algorithm as the Triton kernel
// (triton_kernels/compaction.py), which explains why it is safe:
//   * one CTA per head copies kept row keep_idx[j] to row j, in chunks of R rows;
//   * inside a chunk every row is loaded (into registers) before any is stored (__syncthreads);
//   * since keep_idx[j] >= j, chunk c only reads rows >= c * R, which no earlier chunk wrote.
// Rows move as 16-byte words where alignment allows; rows with keep_idx[j] == j are skipped.
//
// Per chunk the CTA first resolves each row's source and destination byte offsets into shared
// memory (one lane per row), then every thread moves ITEMS words of K and V: the words of a row
// are spread over consecutive threads, so each warp's accesses are coalesced.

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/extension.h>

#include <algorithm>
#include <cstdint>

namespace {

constexpr int kThreads = 512;
constexpr int kItems = 16;    // words per thread per chunk (independent loads in flight)
constexpr int kMaxRows = 512; // rows per chunk at most (shared-memory offset table)

template <typename Word, typename Idx>
__global__ void __launch_bounds__(kThreads) compact_kernel(
    char* k, char* v,  // not __restrict__: a CTA reads and writes the same rows
    const int32_t* __restrict__ table, const Idx* __restrict__ keep_idx,
    const int32_t* __restrict__ keep_len, int64_t stride_block, int64_t stride_row,
    int64_t stride_table, int64_t stride_keep, int block_size, int words_per_row, int rows) {
  // Byte offsets of each row of the chunk; src < 0 means "nothing to move". Two buffers: a
  // thread may fill the next chunk's while another still reads this chunk's.
  __shared__ int64_t src_off[2][kMaxRows];
  __shared__ int64_t dst_off[2][kMaxRows];

  const int head = blockIdx.x;
  const int n_keep = keep_len[head];
  const int32_t* blocks = table + head * stride_table;
  const Idx* keep = keep_idx + head * stride_keep;
  const int per_cache = rows * words_per_row;  // words of one cache in a chunk

  for (int start = 0, buf = 0; start < n_keep; start += rows, buf ^= 1) {
    for (int r = threadIdx.x; r < rows; r += kThreads) {
      const int j = start + r;
      int64_t src = -1, dst = 0;
      if (j < n_keep) {
        const int64_t s = static_cast<int64_t>(keep[j]);
        if (s != j) {
          src = blocks[s / block_size] * stride_block + (s % block_size) * stride_row;
          dst = blocks[j / block_size] * stride_block + (j % block_size) * stride_row;
        }
      }
      src_off[buf][r] = src;
      dst_off[buf][r] = dst;
    }
    __syncthreads();

    Word data[kItems];
#pragma unroll
    for (int i = 0; i < kItems; ++i) {
      const int item = threadIdx.x + i * kThreads;  // [0, 2 * per_cache): K words, then V words
      const int in_cache = item < per_cache ? item : item - per_cache;
      const int r = in_cache / words_per_row;
      if (item < 2 * per_cache && src_off[buf][r] >= 0) {
        const char* cache = item < per_cache ? k : v;
        data[i] = reinterpret_cast<const Word*>(cache + src_off[buf][r])[in_cache - r * words_per_row];
      }
    }
    __syncthreads();  // every read of this chunk precedes every write of it
#pragma unroll
    for (int i = 0; i < kItems; ++i) {
      const int item = threadIdx.x + i * kThreads;
      const int in_cache = item < per_cache ? item : item - per_cache;
      const int r = in_cache / words_per_row;
      if (item < 2 * per_cache && src_off[buf][r] >= 0) {
        char* cache = item < per_cache ? k : v;
        reinterpret_cast<Word*>(cache + dst_off[buf][r])[in_cache - r * words_per_row] = data[i];
      }
    }
  }
}

template <typename Word>
void launch(const torch::Tensor& key_cache, const torch::Tensor& value_cache,
            const torch::Tensor& table, const torch::Tensor& keep_idx,
            const torch::Tensor& keep_len, cudaStream_t stream) {
  const int64_t elem = key_cache.element_size();
  const int words_per_row = static_cast<int>(key_cache.size(2) * elem / sizeof(Word));
  const int rows = std::min<int>(kMaxRows, kItems * kThreads / (2 * words_per_row));
  TORCH_CHECK(rows >= 1, "compact: rows of ", key_cache.size(2) * elem, " bytes are too long");
  const int num_heads = static_cast<int>(table.size(0));
  auto* k = static_cast<char*>(key_cache.data_ptr());
  auto* v = static_cast<char*>(value_cache.data_ptr());
  const int64_t sb = key_cache.stride(0) * elem, sr = key_cache.stride(1) * elem;
  const int bs = static_cast<int>(key_cache.size(1));
  if (keep_idx.scalar_type() == torch::kInt64) {
    compact_kernel<Word, int64_t><<<num_heads, kThreads, 0, stream>>>(
        k, v, table.data_ptr<int32_t>(), keep_idx.data_ptr<int64_t>(), keep_len.data_ptr<int32_t>(),
        sb, sr, table.stride(0), keep_idx.stride(0), bs, words_per_row, rows);
  } else {
    compact_kernel<Word, int32_t><<<num_heads, kThreads, 0, stream>>>(
        k, v, table.data_ptr<int32_t>(), keep_idx.data_ptr<int32_t>(), keep_len.data_ptr<int32_t>(),
        sb, sr, table.stride(0), keep_idx.stride(0), bs, words_per_row, rows);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

// key_cache, value_cache: [num_head_blocks, block_size, head_dim], same dtype and strides, rows
//                         contiguous; modified in place.
// head_block_table: int32 [num_heads, max_blocks]; keep_idx: int32/int64 [num_heads, max_keep]
// (strictly increasing per head); keep_len: int32 [num_heads].
void compact_cuda(torch::Tensor key_cache, torch::Tensor value_cache, torch::Tensor head_block_table,
                  torch::Tensor keep_idx, torch::Tensor keep_len) {
  TORCH_CHECK(key_cache.is_cuda() && value_cache.is_cuda() && head_block_table.is_cuda() &&
                  keep_idx.is_cuda() && keep_len.is_cuda(),
              "compact: all tensors must be on the GPU");
  TORCH_CHECK(key_cache.dim() == 3 && key_cache.sizes() == value_cache.sizes() &&
                  key_cache.strides() == value_cache.strides() &&
                  key_cache.scalar_type() == value_cache.scalar_type(),
              "compact: key_cache and value_cache must be [blocks, block_size, head_dim] alike");
  TORCH_CHECK(key_cache.stride(2) == 1, "compact: cache rows must be contiguous");
  TORCH_CHECK(head_block_table.scalar_type() == torch::kInt32 && head_block_table.stride(1) == 1,
              "compact: head_block_table must be int32 with a unit last stride");
  TORCH_CHECK((keep_idx.scalar_type() == torch::kInt32 || keep_idx.scalar_type() == torch::kInt64) &&
                  keep_idx.stride(1) == 1,
              "compact: keep_idx must be int32/int64 with a unit last stride");
  TORCH_CHECK(keep_len.scalar_type() == torch::kInt32 && keep_len.is_contiguous(),
              "compact: keep_len must be contiguous int32");
  if (head_block_table.size(0) == 0 || keep_idx.size(1) == 0) return;

  const c10::cuda::CUDAGuard guard(key_cache.device());
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  // Widest word that divides the row, both strides and both base addresses.
  const int64_t elem = key_cache.element_size();
  const uint64_t bits = static_cast<uint64_t>(key_cache.size(2) * elem) |
                        static_cast<uint64_t>(key_cache.stride(0) * elem) |
                        static_cast<uint64_t>(key_cache.stride(1) * elem) |
                        reinterpret_cast<uint64_t>(key_cache.data_ptr()) |
                        reinterpret_cast<uint64_t>(value_cache.data_ptr());
  if (bits % 16 == 0) {
    launch<uint4>(key_cache, value_cache, head_block_table, keep_idx, keep_len, stream);
  } else if (bits % 8 == 0) {
    launch<uint2>(key_cache, value_cache, head_block_table, keep_idx, keep_len, stream);
  } else if (bits % 4 == 0) {
    launch<uint32_t>(key_cache, value_cache, head_block_table, keep_idx, keep_len, stream);
  } else if (bits % 2 == 0) {
    launch<uint16_t>(key_cache, value_cache, head_block_table, keep_idx, keep_len, stream);
  } else {
    launch<uint8_t>(key_cache, value_cache, head_block_table, keep_idx, keep_len, stream);
  }
}
