"""A1111 infotext: building, parsing real-world texts, round trips, request-field mapping."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipelines.outputs.infotext import (
    InfoText,
    InfotextValueError,
    build_infotext,
    infotext_to_request_fields,
    parse_infotext,
    quote_value,
)

# Samples written for these tests in the shape A1111 1.6-1.10 and Civitai produce.
CIVITAI_HIRES_LORA = (
    "masterpiece, best quality, 1girl, solo, (looking at viewer:1.2), city lights, night,\n"
    "<lora:add_detail:0.6>, <lora:film_grain_v2:0.4>, bokeh\n"
    "Negative prompt: (worst quality, low quality:1.4), easynegative, watermark, signature\n"
    "Steps: 28, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 6.5, Seed: 3141592653, "
    "Size: 512x768, Model hash: 7f96a1a9ca, Model: anyLoraCheckpoint_bakedvaeBlessedFp16, "
    "VAE hash: 735e4c3a44, VAE: vae-ft-mse-840000-ema-pruned.safetensors, Denoising strength: 0.45, "
    "Clip skip: 2, Hires upscale: 2, Hires steps: 12, Hires upscaler: 4x-UltraSharp, "
    'Lora hashes: "add_detail: 7c6bad76eb54, film_grain_v2: 1a2b3c4d5e6f", '
    'TI hashes: "easynegative: c74b4e810b03", '
    'Civitai resources: [{"type":"checkpoint","modelVersionId":93208},'
    '{"type":"lora","weight":0.6,"modelVersionId":62833}], '
    "Version: v1.10.1"
)

MULTILINE_BOTH = (
    "a watercolor painting of a lighthouse\n"
    "\n"
    "stormy sea, dramatic sky\n"
    "Negative prompt: photo, 3d render\n"
    "blurry\n"
    "Steps: 20, Sampler: Euler a, Schedule type: Automatic, CFG scale: 7, Seed: 42, Size: 768x512, "
    "Model hash: 6ce0161689, Model: v1-5-pruned-emaonly, Version: v1.9.4"
)

NO_NEGATIVE = (
    "portrait of an old fisherman, detailed skin\n"
    "Steps: 30, Sampler: DDIM, CFG scale: 9, Seed: 7, Size: 512x512"
)

DYNAMIC_PROMPTS = (
    "a photo of a red fox in a forest\n"
    "Negative prompt: cartoon\n"
    "Steps: 25, Sampler: UniPC, CFG scale: 7, Seed: 99, Size: 512x512, Model hash: 6ce0161689, "
    'Template: "a photo of a {red|arctic} fox in a {forest|desert}", '
    'Negative Template: "cartoon, {sketch|drawing}", Version: v1.10.1'
)

LEGACY_SAMPLER_NAME = (
    "castle on a hill, golden hour\n"
    "Negative prompt: lowres\n"
    "Steps: 35, Sampler: DPM++ SDE Karras, CFG scale: 8, Seed: 1234, Size: 640x448, "
    "Model hash: e6e99610c4, Seed resize from: 512x384, Variation seed: 55, Variation seed strength: 0.3, "
    "ENSD: 31337, Hires resize: 1280x896, Hires sampler: DPM++ 2M SDE Exponential, Denoising strength: 0.5"
)

PROMPT_ONLY = "a photo of a cat: fluffy, cute, sitting"


def test_build_infotext_matches_a1111_layout() -> None:
    text = build_infotext(
        "a cat",
        "dog",
        {
            "Steps": 20,
            "Sampler": "Euler a",
            "Schedule type": "Automatic",
            "CFG scale": 7.0,
            "Seed": 1,
            "Size": "512x512",
            "Model hash": "abcdef1234",
            "Model": "name",
            "Version": "v1.10.1",
        },
    )
    assert text == (
        "a cat\nNegative prompt: dog\n"
        "Steps: 20, Sampler: Euler a, Schedule type: Automatic, CFG scale: 7, Seed: 1, Size: 512x512, "
        "Model hash: abcdef1234, Model: name, Version: v1.10.1"
    )


def test_build_infotext_omits_empty_negative_and_none_values() -> None:
    text = build_infotext("a cat", "", {"Steps": 20, "Eta": None, "CFG scale": 7.5, "Seed": 3})
    assert text == "a cat\nSteps: 20, CFG scale: 7.5, Seed: 3"


@pytest.mark.parametrize(
    ("value", "printed"),
    [
        (7.0, "7"),
        (7.5, "7.5"),
        (0.35, "0.35"),
        (2, "2"),
        (True, "True"),
        (False, "False"),
        ("a, b", '"a, b"'),
        ("x: y", '"x: y"'),
        ('say "hi"', '"say \\"hi\\""'),
        ("two\nlines", '"two\\nlines"'),
        ("日本語, テスト", '"日本語, テスト"'),
        ("", '""'),
        (" padded", '" padded"'),
    ],
)
def test_value_formatting_and_quoting(value: object, printed: str) -> None:
    text = build_infotext("p", "", {"Key": value, "Steps": 1, "Seed": 2})
    assert text.split("\n")[-1].startswith(f"Key: {printed}, ")


def test_quote_value_leaves_plain_values_alone() -> None:
    assert quote_value("4x-UltraSharp") == "4x-UltraSharp"
    assert quote_value("v1.10.1") == "v1.10.1"
    assert json.loads(quote_value("a,b")) == "a,b"


@pytest.mark.parametrize("bad_key", ["", "x", "Eta (DDIM)", "a,b", " Steps", "Steps ", "Key:"])
def test_build_infotext_rejects_keys_a1111_cannot_read(bad_key: str) -> None:
    with pytest.raises(ValueError, match="infotext parameter name"):
        build_infotext("p", "", {bad_key: 1, "Steps": 1, "Seed": 2})


def test_parse_civitai_text_with_loras_hires_and_json() -> None:
    info = parse_infotext(CIVITAI_HIRES_LORA)
    assert info.prompt == (
        "masterpiece, best quality, 1girl, solo, (looking at viewer:1.2), city lights, night,\n"
        "<lora:add_detail:0.6>, <lora:film_grain_v2:0.4>, bokeh"
    )
    assert info.negative_prompt == "(worst quality, low quality:1.4), easynegative, watermark, signature"
    assert info.steps == 28
    assert info.sampler_name == "DPM++ 2M"
    assert info.schedule_type == "Karras"
    assert info.cfg_scale == 6.5
    assert info.seed == 3141592653
    assert (info.width, info.height) == (512, 768)
    assert info.clip_skip == 2
    assert info.denoising_strength == 0.45
    assert info.model_name == "anyLoraCheckpoint_bakedvaeBlessedFp16"
    assert info.model_hash == "7f96a1a9ca"
    assert info.params["Hires upscale"] == "2"
    assert info.params["Hires upscaler"] == "4x-UltraSharp"
    assert info.get_hashes("Lora hashes") == {"add_detail": "7c6bad76eb54", "film_grain_v2": "1a2b3c4d5e6f"}
    assert info.get_hashes("TI hashes") == {"easynegative": "c74b4e810b03"}
    resources = json.loads(info.params["Civitai resources"])
    assert [item["type"] for item in resources] == ["checkpoint", "lora"]
    assert info.params["Version"] == "v1.10.1"
    assert list(info.params)[:3] == ["Steps", "Sampler", "Schedule type"]


def test_parse_multiline_prompt_and_negative() -> None:
    info = parse_infotext(MULTILINE_BOTH)
    assert info.prompt == "a watercolor painting of a lighthouse\n\nstormy sea, dramatic sky"
    assert info.negative_prompt == "photo, 3d render\nblurry"
    assert info.get_size() == (768, 512)
    assert info.clip_skip == 1  # A1111 omits "Clip skip: 1"


def test_parse_without_negative_prompt() -> None:
    info = parse_infotext(NO_NEGATIVE)
    assert info.prompt == "portrait of an old fisherman, detailed skin"
    assert info.negative_prompt == ""
    assert info.sampler_name == "DDIM"
    assert info.schedule_type is None


def test_parse_dynamic_prompts_templates() -> None:
    info = parse_infotext(DYNAMIC_PROMPTS)
    assert info.params["Template"] == "a photo of a {red|arctic} fox in a {forest|desert}"
    assert info.params["Negative Template"] == "cartoon, {sketch|drawing}"
    assert info.negative_prompt == "cartoon"
    assert info.params["Version"] == "v1.10.1"


def test_last_line_with_fewer_than_three_pairs_is_prompt() -> None:
    info = parse_infotext(PROMPT_ONLY)
    assert info.prompt == PROMPT_ONLY
    assert info.params == {}
    two_pairs = parse_infotext("a dog\nstyle: ink, mood: calm")
    assert two_pairs.prompt == "a dog\nstyle: ink, mood: calm"
    assert two_pairs.params == {}


def test_parse_windows_line_endings_and_surrounding_whitespace() -> None:
    text = "\r\n  a cat  \r\nNegative prompt:  dog \r\nSteps: 20, Seed: 5, Size: 64x64\r\n\r\n"
    info = parse_infotext(text)
    assert (info.prompt, info.negative_prompt) == ("a cat", "dog")
    assert info.params == {"Steps": "20", "Seed": "5", "Size": "64x64"}


def test_quoted_value_that_is_not_followed_by_a_comma_is_kept_raw_like_a1111() -> None:
    info = parse_infotext('p\nSteps: 1, Note: "a" b, Seed: 2, Size: 8x8')
    assert info.params["Note"] == '"a" b'
    assert info.seed == 2


def test_typed_helpers_report_malformed_values_by_key() -> None:
    info = InfoText("p", "", {"Steps": "many", "CFG scale": "high", "Size": "big", "Seed": "12.0"})
    with pytest.raises(InfotextValueError, match="Steps: many"):
        _ = info.steps
    with pytest.raises(InfotextValueError, match="CFG scale"):
        _ = info.cfg_scale
    with pytest.raises(InfotextValueError, match="Size"):
        _ = info.width
    assert info.seed == 12
    assert InfoText("p").steps is None
    assert InfoText("p").get_hashes() == {}
    assert InfoText("p", "", {"Hashes": '{"model": "abc", "vae": "def"}'}).get_hashes("Hashes") == {
        "model": "abc",
        "vae": "def",
    }


@pytest.mark.parametrize("sample", [CIVITAI_HIRES_LORA, MULTILINE_BOTH, NO_NEGATIVE, DYNAMIC_PROMPTS])
def test_parse_then_build_then_parse_is_stable(sample: str) -> None:
    first = parse_infotext(sample)
    again = parse_infotext(build_infotext(first.prompt, first.negative_prompt, dict(first.params)))
    assert again == first


def test_round_trip_of_awkward_values() -> None:
    params: dict[str, object] = {
        "Steps": 20,
        "Sampler": "DPM++ 2M SDE",
        "CFG scale": 4.5,
        "Seed": 18446744073709551615,
        "Lora hashes": "detail: 0123abcd, style: 4567ef01",
        "Hires prompt": 'a "quoted" word,\nnew line: colon',
        "Quote only": 'x"y',
        "Backslash": "C:\\models\\a.safetensors",
        "Empty": "",
        "Brackets": "[1, 2]",
        "Unicode": "猫, ねこ",
    }
    text = build_infotext("first line\nsecond, line: (x:1.1)", "neg, line\nmore", params)
    info = parse_infotext(text)
    assert info.prompt == "first line\nsecond, line: (x:1.1)"
    assert info.negative_prompt == "neg, line\nmore"
    assert info.params == {
        key: str(value) if not isinstance(value, float) else "4.5" for key, value in params.items()
    }


_LINE_CHARS = st.characters(blacklist_categories=("Cc", "Cs", "Zl", "Zp"), blacklist_characters="\x85")
_line = (
    st.text(_LINE_CHARS, max_size=30).map(str.strip).filter(lambda s: not s.startswith("Negative prompt:"))
)
_prompt = st.lists(_line, max_size=4).map("\n".join).map(str.strip)
_key = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9 \-/]{0,15}[A-Za-z0-9\-/]", fullmatch=True)
_value = st.one_of(
    st.text(st.characters(blacklist_categories=("Cs",)), max_size=25),
    st.integers(min_value=-(2**64), max_value=2**64).map(str),
    st.floats(allow_nan=False, allow_infinity=False).map(repr),
)


@settings(max_examples=300, deadline=None)
@given(prompt=_prompt, negative=_prompt, params=st.dictionaries(_key, _value, min_size=3, max_size=8))
def test_round_trip_property(prompt: str, negative: str, params: dict[str, str]) -> None:
    info = parse_infotext(build_infotext(prompt, negative, params))
    assert info.prompt == prompt
    assert info.negative_prompt == negative
    assert info.params == params


def test_request_fields_from_civitai_text() -> None:
    fields = infotext_to_request_fields(parse_infotext(CIVITAI_HIRES_LORA))
    assert fields["prompt"].endswith("<lora:film_grain_v2:0.4>, bokeh")
    assert fields["negative_prompt"].startswith("(worst quality")
    expected = {
        "steps": 28,
        "sampler_name": "DPM++ 2M",
        "scheduler": "Karras",
        "cfg_scale": 6.5,
        "seed": 3141592653,
        "width": 512,
        "height": 768,
        "clip_skip": 2,
        "denoising_strength": 0.45,
        "enable_hr": True,
        "hr_scale": 2.0,
        "hr_second_pass_steps": 12,
        "hr_upscaler": "4x-UltraSharp",
    }
    assert {key: fields[key] for key in expected} == expected
    assert fields["override_settings"] == {
        "sd_model_checkpoint": "anyLoraCheckpoint_bakedvaeBlessedFp16",
        "sd_vae": "vae-ft-mse-840000-ema-pruned.safetensors",
    }


def test_request_fields_split_legacy_sampler_names_and_variation_seed() -> None:
    fields = infotext_to_request_fields(parse_infotext(LEGACY_SAMPLER_NAME))
    assert (fields["sampler_name"], fields["scheduler"]) == ("DPM++ SDE", "Karras")
    assert (fields["hr_sampler_name"], fields["hr_scheduler"]) == ("DPM++ 2M SDE", "Exponential")
    assert (fields["subseed"], fields["subseed_strength"]) == (55, 0.3)
    assert (fields["seed_resize_from_w"], fields["seed_resize_from_h"]) == (512, 384)
    assert (fields["hr_resize_x"], fields["hr_resize_y"]) == (1280, 896)
    assert fields["enable_hr"] is True
    assert fields["override_settings"] == {"sd_model_checkpoint": "e6e99610c4", "eta_noise_seed_delta": 31337}


def test_request_fields_defaults_and_leniency() -> None:
    fields = infotext_to_request_fields(
        parse_infotext(
            "p\nSteps: lots, Sampler: k_euler_a, CFG scale: 7, Seed: 5, Size: 64x64, Denoising strength: 0.4"
        )
    )
    assert "steps" not in fields  # malformed values are skipped, not fatal
    assert fields["sampler_name"] == "Euler a"
    assert fields["scheduler"] == "Automatic"
    assert fields["clip_skip"] == 1
    assert fields["enable_hr"] is False  # denoising strength alone is img2img, not hires
    assert "override_settings" not in fields

    unknown = infotext_to_request_fields(
        parse_infotext("p\nSteps: 5, Sampler: Euler CFG++, Seed: 1, Schedule type: kl_optimal")
    )
    assert unknown["sampler_name"] == "Euler CFG++"  # passed through for the API to reject with choices
    assert unknown["scheduler"] == "kl_optimal"

    lowercase = infotext_to_request_fields(
        parse_infotext("p\nSteps: 5, Sampler: Euler, Seed: 1, Schedule type: karras")
    )
    assert lowercase["scheduler"] == "Karras"


def test_request_fields_from_old_first_pass_size_hires() -> None:
    fields = infotext_to_request_fields(
        parse_infotext(
            "p\nSteps: 20, Seed: 1, Size: 1024x1024, First pass size: 512x512, Denoising strength: 0.6"
        )
    )
    assert (fields["width"], fields["height"]) == (512, 512)
    assert (fields["hr_resize_x"], fields["hr_resize_y"]) == (1024, 1024)
    assert fields["enable_hr"] is True


def test_face_restoration_and_tiling_are_pasted_back() -> None:
    text = "a face\nSteps: 20, Seed: 1, Face restoration: RestoreFormer, Tiling: True, Model: m"
    fields = infotext_to_request_fields(parse_infotext(text))
    assert fields["restore_faces"] is True and fields["tiling"] is True
    overrides = fields["override_settings"]
    assert overrides == {"face_restoration_model": "RestoreFormer", "sd_model_checkpoint": "m"}
    plain = infotext_to_request_fields(parse_infotext("a face\nSteps: 20, Seed: 1"))
    assert "restore_faces" not in plain and "tiling" not in plain
