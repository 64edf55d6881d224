"""The scripts of ``benchmarks/`` (a folder of scripts, not a package), imported by file for tests.

Each is loaded once per session under ``kvc_benchmark_<name>`` (registered in ``sys.modules``
before it runs: dataclasses look their module up there)."""
import importlib.util
import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def load(name: str):
    key = f"kvc_benchmark_{name}"
    if key not in sys.modules:
        spec = importlib.util.spec_from_file_location(key, BENCHMARKS / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[key] = module
        spec.loader.exec_module(module)
    return sys.modules[key]
