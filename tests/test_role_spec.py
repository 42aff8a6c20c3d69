"""`PROVIDER:MODEL` role strings: what parses, what is refused, and that parsing is stable."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from imageloop.config import RoleSpec
from imageloop.errors import ConfigError


def test_the_model_part_keeps_its_own_colons() -> None:
    assert RoleSpec.parse(" Ollama : llava:13b ", "vlm") == RoleSpec("ollama", "llava:13b")


@pytest.mark.parametrize("text", ["", "openai", "openai:", ":gpt-4.1", "  :  ", "\t:x"])
def test_a_string_without_both_parts_is_refused_naming_the_setting(text: str) -> None:
    with pytest.raises(ConfigError, match=r"`vlm` .*expected PROVIDER:MODEL"):
        RoleSpec.parse(text, "vlm")


@settings(max_examples=500)
@given(st.text())
def test_any_text_parses_or_raises_config_error(text: str) -> None:
    try:
        spec = RoleSpec.parse(text, "generator")
    except ConfigError as e:
        assert "\n" not in str(e)  # one line, the input shown as a repr
        return
    assert spec.provider and spec.model
    assert ":" not in spec.provider
    assert spec.provider == spec.provider.strip().lower() and spec.model == spec.model.strip()


@settings(max_examples=500)
@given(st.text(), st.text())
def test_a_parsed_spec_parses_back_to_itself(provider: str, model: str) -> None:
    try:
        spec = RoleSpec.parse(f"{provider}:{model}", "embedder")
    except ConfigError:
        return
    assert RoleSpec.parse(str(spec), "embedder") == spec
