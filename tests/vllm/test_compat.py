"""The vLLM internals the plugin relies on (vllm/compat.py) are where and what they were in 0.26.0.

An upgrade of vLLM makes these fail, naming each internal that moved or changed: mend those places
of the integration, then the pins."""
import pytest
import vllm

from vllm_kvcompress.vllm import compat


def test_the_installed_vllm_is_the_pinned_one():
    assert vllm.__version__ == compat.VLLM_VERSION


@pytest.mark.parametrize("key", sorted(compat.PINNED))
def test_every_pinned_internal_is_as_pinned(key):
    assert compat.mismatches([key]) == []


def test_the_pins_check_vllm_own_methods_where_the_plugin_wraps_them():
    """Loaded as a plugin, the EngineArgs wrappers stand in vLLM's class: the pins still see vLLM's."""
    from vllm_kvcompress.vllm import patches
    from vllm_kvcompress.vllm.compat import EngineArgs

    assert patches.apply()
    assert EngineArgs.__dict__["add_cli_args"].__func__ is patches._add_cli_args
    assert compat.mismatches([k for k in compat.PINNED if k.startswith("vllm.engine.arg_utils:")]) == []


def test_the_fields_and_flash_attention_keywords_the_plugin_reads_exist():
    found = compat.mismatches()
    assert found == [], "\n".join(found)


@pytest.mark.parametrize("name", sorted(compat.SYMBOLS))
def test_every_symbol_resolves(name):
    assert getattr(compat, name) is not None


def test_a_moved_internal_is_named(monkeypatch):
    """The check fails on a change, and says which internal and how."""
    key = "vllm.v1.worker.block_table:BlockTable.append_row"
    monkeypatch.setitem(compat.PINNED, key, "(self, block_ids, row_idx, extra)")
    assert compat.mismatches([key]) == [f"{key}: (self, block_ids: list[int], row_idx: int) -> None "
                                        "(pinned: (self, block_ids, row_idx, extra))"]
    gone = "vllm.v1.worker.block_table:BlockTable.no_such_method"
    monkeypatch.setitem(compat.PINNED, gone, None)
    assert compat.mismatches([gone])[0].startswith(f"{gone}: gone")
    with pytest.raises(AttributeError, match="not a vLLM symbol the plugin uses"):
        compat.NotAVllmThing  # noqa: B018


def test_the_integration_imports_vllm_only_through_compat():
    """No integration module imports vLLM itself (patches.py reads vllm.__version__ only)."""
    import pathlib
    import re

    folder = pathlib.Path(compat.__file__).parent
    offenders = [f"{path.name}:{number}" for path in folder.glob("*.py") if path.name != "compat.py"
                 for number, line in enumerate(path.read_text().splitlines(), 1)
                 if re.match(r"\s*(from vllm[. ]|import vllm\.)", line)]
    assert offenders == []
