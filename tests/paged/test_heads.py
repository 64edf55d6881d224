"""PagedHeads over an fp8 key cache: the window mass of the keys its scale stands for."""
import torch

from vllm_kvcompress.paged import reference
from vllm_kvcompress.paged.heads import PagedHeads


def test_fp8_window_mass_is_that_of_the_dequantized_keys():
    gen = torch.Generator().manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"  # the kernel on a GPU, the reference here
    k_scale = torch.tensor([0.03], device=device)
    key_cache = reference.quantize(torch.randn(9, 16, 64, generator=gen), k_scale.cpu(), torch.float8_e4m3fn)
    key_cache = key_cache.to(device)
    table = torch.randperm(9, generator=gen)[:8].view(2, 4).int().to(device)
    lengths = torch.tensor([50, 37], device=device)
    queries = torch.randn(2, 4, 6, 64, generator=gen).to(device)
    fp8 = PagedHeads(queries, key_cache, table, lengths, 50, k_scale=k_scale)
    values = PagedHeads(queries, reference.dequantize(key_cache, k_scale), table, lengths, 50)
    for power in (1, 2):
        torch.testing.assert_close(fp8.window_mass(power), values.window_mass(power), rtol=1e-4, atol=1e-6)
