"""Paper presets as profiles: they set knobs only, combine with a model profile, and the README lists them."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from imageloop.cli import _given, _settings, build_parser
from imageloop.config import MODEL_PROFILES, PROFILES, ROLES, Settings, load_settings
from imageloop.errors import ConfigError
from imageloop.knobs import ImageRAGKnobs
from imageloop.presets import GENIR_PAPER, IMAGERAG_PAPER, PRESETS

README = Path(__file__).resolve().parents[1] / "README.md"


def test_a_preset_sets_every_paper_knob_and_no_model() -> None:
    for name, preset in PRESETS.items():
        assert PROFILES[name] == {knob: paper.value for knob, paper in preset.items()}
        assert set(preset) <= set(Settings.model_fields)
        assert not set(preset) & {*ROLES, *(f"{role}_base_url" for role in ROLES)}
        assert all(paper.source for paper in preset.values())


def test_a_preset_on_top_of_a_model_profile_keeps_the_models_and_takes_the_knobs() -> None:
    settings = load_settings("openai,imagerag-paper")
    assert settings.vlm == MODEL_PROFILES["openai"]["vlm"] and settings.generator == "openai:gpt-image-1"
    assert (settings.critic, settings.plan_scope, settings.final_image_policy) == ("paper", "every", "last")
    assert (settings.top_k, settings.max_iterations, settings.seed) == (1, 1, 0)


def test_profiles_apply_left_to_right_and_options_win_over_them() -> None:
    assert load_settings(["imagerag-paper", "tiny"]).critic == "paper"  # tiny names models only
    settings = load_settings(["tiny", "genir-paper"], {"rounds": 3, "simulated_user": "ours"})
    assert (settings.generator, settings.rounds, settings.simulated_user) == ("tiny:omnigen", 3, "ours")
    assert settings.user_temperature == GENIR_PAPER["user_temperature"].value


def test_the_environment_names_several_profiles_with_commas() -> None:
    settings = load_settings(environ={"IMAGELOOP_PROFILE": "local, genir-paper"})
    assert settings.vlm == MODEL_PROFILES["local"]["vlm"] and settings.flux_redux == "none"


def test_an_unknown_profile_in_a_list_is_named() -> None:
    with pytest.raises(ConfigError, match="unknown profile 'imagerag'; known: genir-paper, imagerag-paper, local"):
        load_settings("openai,imagerag")


def test_the_command_line_takes_a_profile_twice_or_a_list() -> None:
    for profile in (["--profile", "openai", "--profile", "imagerag-paper"], ["--profile", "openai,imagerag-paper"]):
        args = build_parser().parse_args(["generate", "a jay", "--index", "i", "--out", "o", *profile])
        settings = _settings(args)
        assert (settings.vlm, settings.critic) == ("openai:gpt-4.1-mini", "paper")
    args = build_parser().parse_args(["generate", "a jay", "--profile", "imagerag-paper", "--critic", "single_call"])
    run = ImageRAGKnobs.from_settings(_settings(args)).overridden(_given(args, ImageRAGKnobs))
    assert (run.critic, run.plan_scope) == ("single_call", "every")  # the option over the preset, the rest kept


def test_the_readme_presets_table_lists_every_paper_value() -> None:
    text = README.read_text(encoding="utf-8")
    rows = {
        (match["preset"], match["knob"]): match["value"].strip()
        for match in re.finditer(r"^\| `(?P<preset>[\w-]+)` \| `(?P<knob>\w+)` \| (?P<value>[^|]+)\|", text, re.M)
    }
    for name, preset in PRESETS.items():
        for knob, paper in preset.items():
            shown = "none" if paper.value is None else str(paper.value).lower()
            assert rows.get((name, knob)) == f"`{shown}`", f"README presets table: {name} {knob}"
    assert set(IMAGERAG_PAPER) | set(GENIR_PAPER) >= {"critic", "simulated_user", "rounds"}
