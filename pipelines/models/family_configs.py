"""Read the diffusers configs that SD Studio ships for each supported model family.

Loading a user's single-file checkpoint must never touch the network, yet diffusers needs a
component config (UNet, VAE, text encoders, scheduler...) for every part it builds. The configs
of the official hub repos live in ``configs/<family>/`` (see ``configs/README.md`` for where each
value comes from), laid out as a config-only diffusers repo so the folder itself can be passed
as ``config=`` to ``from_single_file``. Next to them, ``original.yaml`` is the LDM/SGM inference
config of the family, for loaders that want ``original_config=``.

Every function reads the files afresh and returns a new ``dict``: callers may mutate what they
get without affecting anyone else, and the module holds no state.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

FAMILIES: tuple[str, ...] = (
    "sd1",
    "sd1-inpaint",
    "sd2",
    "sd2-base",
    "sd2-inpaint",
    "sdxl",
    "sdxl-inpaint",
    "sdxl-refiner",
)

CONFIGS_ROOT = Path(__file__).resolve().parents[2] / "configs"

# The file that holds a component's config, where it is not ``<component>/config.json``.
_CONFIG_FILE_NAMES: dict[str, str] = {
    "scheduler": "scheduler_config.json",
    "tokenizer": "tokenizer_config.json",
    "tokenizer_2": "tokenizer_config.json",
}

ORIGINAL_CONFIG_NAME = "original.yaml"
MODEL_INDEX_NAME = "model_index.json"


class UnknownModelFamilyError(ValueError):
    """A model family name that SD Studio ships no configs for."""


class MissingFamilyConfigError(FileNotFoundError):
    """A family is known but the requested component (or file) is not part of it."""


def family_config_dir(family: str) -> Path:
    """The folder holding the config-only diffusers repo of ``family``.

    Raises ``UnknownModelFamilyError`` (listing the known families) for any other name.
    """
    if family not in FAMILIES:
        known = ", ".join(FAMILIES)
        raise UnknownModelFamilyError(
            f"Unknown model family {family!r}. Known families: {known}. "
            "Pick one of these, or add a configs/<family>/ folder and list it in FAMILIES."
        )
    return CONFIGS_ROOT / family


def family_components(family: str) -> tuple[str, ...]:
    """The component folders shipped for ``family`` (e.g. ``unet``, ``vae``, ``text_encoder_2``)."""
    directory = family_config_dir(family)
    if not directory.is_dir():
        raise MissingFamilyConfigError(
            f"The config folder for model family {family!r} is missing: {directory}. "
            "Restore it from the repository (git checkout -- configs/)."
        )
    return tuple(sorted(child.name for child in directory.iterdir() if child.is_dir()))


def component_config_path(family: str, component: str) -> Path:
    """Path of the JSON config of ``component`` (``model_index`` gives the pipeline's index)."""
    directory = family_config_dir(family)
    if component == "model_index":
        path = directory / MODEL_INDEX_NAME
    else:
        path = directory / component / _CONFIG_FILE_NAMES.get(component, "config.json")
    if not path.is_file():
        shipped = ", ".join(family_components(family)) if directory.is_dir() else "none"
        raise MissingFamilyConfigError(
            f"Model family {family!r} has no {component!r} config (looked for {path}). "
            f"Components shipped for this family: {shipped}."
        )
    return path


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"The config file {path} is not valid JSON ({exc}); restore it from git.") from exc
    if not isinstance(data, dict):
        raise ValueError(f"The config file {path} should hold a JSON object; restore it from git.")
    return data


def load_component_config(family: str, component: str) -> dict[str, Any]:
    """The diffusers/transformers config dict of one component of ``family``.

    ``component`` is a folder name of the family (``unet``, ``vae``, ``text_encoder``,
    ``text_encoder_2``, ``scheduler``, ``tokenizer``, ``tokenizer_2``) or ``model_index``.
    For tokenizers this is ``tokenizer_config.json``; see ``tokenizer_pad_token`` for the pad
    token actually in effect.
    """
    return _read_json(component_config_path(family, component))


def scheduler_config(family: str) -> dict[str, Any]:
    """The scheduler config of ``family`` (its ``prediction_type`` tells epsilon from v-prediction)."""
    return load_component_config(family, "scheduler")


def load_original_config(family: str) -> dict[str, Any]:
    """The original LDM/SGM inference config of ``family`` (``original.yaml``), parsed."""
    import yaml

    path = family_config_dir(family) / ORIGINAL_CONFIG_NAME
    if not path.is_file():
        raise MissingFamilyConfigError(
            f"Model family {family!r} has no {ORIGINAL_CONFIG_NAME} (looked for {path}); restore it from git."
        )
    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    if not isinstance(data, dict) or "model" not in data:
        raise ValueError(f"{path} should be an LDM/SGM config with a top-level 'model' section.")
    return data


def tokenizer_pad_token(family: str, tokenizer: str = "tokenizer") -> str:
    """The pad token a ``CLIPTokenizer`` loaded from these files would use.

    Why not just ``tokenizer_config.json``: the SD 2.x hub repos say ``<|endoftext|>`` there but
    ``!`` in ``special_tokens_map.json``, and transformers lets the latter win. We apply the same
    rule so callers of ``pipelines.prompts.tokenizer.build_clip_tokenizer`` pick the right pad token.
    """
    pad_token: Any = load_component_config(family, tokenizer).get("pad_token")
    special_tokens_path = family_config_dir(family) / tokenizer / "special_tokens_map.json"
    if special_tokens_path.is_file():
        pad_token = _read_json(special_tokens_path).get("pad_token", pad_token)
    if isinstance(pad_token, dict):
        pad_token = pad_token.get("content")
    if not isinstance(pad_token, str):
        raise ValueError(
            f"No pad token is defined for {tokenizer!r} of model family {family!r}; "
            f"check {special_tokens_path.parent}."
        )
    return pad_token
