"""runtime.StepTimer: one step_time event per worker step, with the time of its regions."""
import time

from vllm_kvcompress.vllm import runtime


def test_each_step_gets_one_event_with_its_regions(tmp_path, monkeypatch):
    path = tmp_path / "events.jsonl"
    monkeypatch.setenv(runtime.EVENTS_ENV, str(path))
    timer = runtime.StepTimer()
    for step in range(3):
        timer.step_started(rows=step + 1, tokens=10 * (step + 1))
        with timer.host("layout_ms"):
            time.sleep(0.002)
        with timer.device("recompress_ms", on_cuda=False):  # the CPU: host time
            time.sleep(0.004 if step == 1 else 0)
        timer.note(graph=step > 0, recompressed_requests=step)
    timer.step_started(rows=0, tokens=0)  # the next step closes the third
    found = [e for e in runtime.read_events(str(path)) if e["kind"] == "step_time"]
    assert [(e["rows"], e["tokens"], e["graph"], e["recompressed_requests"]) for e in found] == \
        [(1, 10, False, 0), (2, 20, True, 1), (3, 30, True, 2)]
    assert all(e["layout_ms"] >= 2 and e["interval_ms"] >= e["layout_ms"] + e["recompress_ms"] for e in found)
    assert found[1]["recompress_ms"] >= 4 > found[0]["recompress_ms"]


def test_off_without_the_events_variable(monkeypatch):
    monkeypatch.delenv(runtime.EVENTS_ENV, raising=False)
    timer = runtime.StepTimer()
    timer.step_started(rows=1, tokens=1)
    with timer.host("layout_ms"):
        pass
    assert timer.current is None and not timer.waiting
