"""benchmarks/profile_engine.py: the table of the host's waits for the GPU."""
import io
import os
import warnings

import benchmark_modules

_environment = dict(os.environ)
profile = benchmark_modules.load("profile_engine")  # sets the engine's variables for its own runs
os.environ.clear()
os.environ.update(_environment)  # not for the other tests'


def test_waits_are_counted_by_the_line_that_made_them_most_first():
    def wait():
        warnings.warn("called a synchronizing CUDA operation")

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            wait()
        warnings.warn("called a synchronizing CUDA operation")
        warnings.warn("something else")  # not a wait
    out = io.StringIO()
    profile.write_waits(out, caught, "a test")
    lines = out.getvalue().splitlines()
    assert lines[1] == "# waits for the GPU over a test: 4"
    assert lines[2].split()[0] == "3" and lines[2].endswith(f":{wait.__code__.co_firstlineno + 1}")
    assert lines[3].split()[0] == "1" and len(lines) == 4
