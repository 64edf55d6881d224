"""The pinned staging ring of the worker's uploads never waits for a copy still in flight."""
import torch

from vllm_kvcompress.vllm.worker.state import PinnedStaging


class Copy:
    """Stands in for the CUDA event after a buffer's copy."""

    def __init__(self, done: bool):
        self.done, self.waited = done, False

    def query(self) -> bool:
        return self.done

    def synchronize(self) -> None:
        self.waited = True


def test_uploads_skip_buffers_still_copying_and_grow_the_ring_instead_of_waiting():
    staging = PinnedStaging(torch.device("cpu"), slots=3, most=5)
    staging.copied = [Copy(False), Copy(True), Copy(False)]
    assert staging._free_slot() == 1  # the one whose copy completed
    staging.copied[1] = Copy(False)
    assert staging._free_slot() == 3 and len(staging.buffers) == 4  # all busy: one more buffer
    staging.copied[3] = Copy(False)
    assert staging._free_slot() == 4
    staging.copied[4] = Copy(False)
    slot = staging._free_slot()  # at the cap: the next buffer's copy is waited for
    assert len(staging.buffers) == 5 and staging.copied[slot].waited
    assert not any(c.waited for i, c in enumerate(staging.copied) if i != slot)


def test_an_upload_returns_its_values_whatever_the_buffer_held():
    staging = PinnedStaging(torch.device("cpu"), slots=2)
    first = staging.upload(torch.arange(5))
    second = staging.upload(torch.tensor([7, 8]))
    third = staging.upload(torch.arange(100_000))  # outgrows the buffer
    assert first.tolist() == list(range(5)) and second.tolist() == [7, 8]
    assert torch.equal(third, torch.arange(100_000))
