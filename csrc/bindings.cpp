// Python bindings of the CUDA kernels: the module vllm_kvcompress._C (built with KVC_BUILD_CUDA=1).
#include <torch/extension.h>

void compact_cuda(torch::Tensor key_cache, torch::Tensor value_cache, torch::Tensor head_block_table,
                  torch::Tensor keep_idx, torch::Tensor keep_len);

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("compact", &compact_cuda,
        "In place: move each head's kept rows (keep_idx) to the front of its head-blocks. "
        "Args: key_cache, value_cache [blocks, block_size, head_dim]; head_block_table int32 "
        "[heads, max_blocks]; keep_idx int32/int64 [heads, max_keep]; keep_len int32 [heads].",
        py::arg("key_cache"), py::arg("value_cache"), py::arg("head_block_table"),
        py::arg("keep_idx"), py::arg("keep_len"));
}
