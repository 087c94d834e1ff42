import pytest

from calbench.errors import CalbenchError
from calbench.registry import Registry


def test_an_entry_added_temporarily_is_gone_after_the_block_even_on_error():
    things: Registry[int] = Registry("thing")
    things.add("kept", 1)
    with things.temporarily("extra", 2) as name:
        assert name == "extra" and things.get("extra") == 2 and things.names() == ["kept", "extra"]
    assert things.names() == ["kept"]
    with pytest.raises(RuntimeError, match="boom"), things.temporarily("extra", 3):
        raise RuntimeError("boom")
    assert "extra" not in things
    with pytest.raises(CalbenchError, match="unknown thing 'extra'"):
        things.get("extra")


def test_a_temporary_entry_cannot_shadow_a_registered_one():
    things: Registry[int] = Registry("thing")
    things.add("kept", 1)
    with pytest.raises(ValueError, match="thing 'kept' is registered twice"), things.temporarily("kept", 2):
        pass
    assert things.get("kept") == 1
