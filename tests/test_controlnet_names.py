"""The request contract validates preprocessor names without importing the engine, so its name
catalogue must stay the engine's: same keys, same API names and labels."""

from __future__ import annotations

from contract.controlnet import PREPROCESSOR_NAMES, resolve_preprocessor_name
from pipelines.controlnet.preprocessors import PREPROCESSORS, resolve_preprocessor


def test_contract_names_match_the_engine_preprocessors() -> None:
    assert list(PREPROCESSORS) == list(PREPROCESSOR_NAMES)
    engine_names = {key: (p.api_name, p.label) for key, p in PREPROCESSORS.items()}
    assert engine_names == PREPROCESSOR_NAMES


def test_every_api_name_and_label_resolves_to_its_key_on_both_sides() -> None:
    for key, (api_name, label) in PREPROCESSOR_NAMES.items():
        for name in (key, api_name, label, label.upper()):
            assert resolve_preprocessor_name(name) == key
            assert resolve_preprocessor(name)[0] == key
