"""What ``pip install .`` ships: every folder of the package (a folder missing from setup.py's list
would install without its modules and fail at import on a user's machine, not here, where the
package is installed editable)."""
import ast
from pathlib import Path

from setuptools import find_packages

REPO = Path(__file__).resolve().parents[1]


def _listed_packages() -> list[str]:
    tree = ast.parse((REPO / "setup.py").read_text())
    call = next(node for node in ast.walk(tree) if isinstance(node, ast.Call) and getattr(node.func, "id", "") == "setup")
    packages = next(k.value for k in call.keywords if k.arg == "packages")
    return [ast.literal_eval(element) for element in packages.elts]


def test_setup_lists_every_folder_of_the_package():
    assert sorted(_listed_packages()) == sorted(find_packages(str(REPO), include=["vllm_kvcompress*"]))
