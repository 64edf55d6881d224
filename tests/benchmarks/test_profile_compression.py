"""benchmarks/profile_compression.py on the CPU: each case compresses what it says, and the report
holds a row and the profiler's tables per case."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "profile_compression.py"


@pytest.mark.parametrize("policy", ["snapkv", "ems"])
def test_profile_compression_times_a_prefill_step_and_a_tick(tmp_path, policy):
    out = tmp_path / "profile.txt"
    result = subprocess.run([sys.executable, str(SCRIPT), "--policies", policy, "--prompts", "96,80", "--prompt", "160",
                             "--requests", "2", "--repeat", "1", "--device", "cpu", "--out", str(out)],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    rows = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert [row["what"].split(" ")[1] for row in rows] == ["prefill", "tick"]
    assert all(row["policy"] == policy and row["wall_ms"] > 0 for row in rows)
    text = out.read_text()
    assert text.count("# torch.profiler over") == 2 and "# summary" in text
