"""LoRA and textual inversion on the tiny SD1 pipeline, with files written the way A1111 users have them."""

from __future__ import annotations

import argparse
import hashlib
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from pipelines.errors import StudioError
from pipelines.models.families import ModelFamily
from pipelines.outputs.infotext import build_infotext
from pipelines.prompts.encoding import encode_prompts
from pipelines.prompts.extra_networks import (
    LORA_HASHES_KEY,
    LoraError,
    LoraNotFoundError,
    apply_loras,
    list_embeddings,
    list_loras,
    load_embeddings_for_prompt,
    lora_hashes,
    parse_lora_ref,
    remove_loras,
    unload_embeddings,
)
from pipelines.prompts.parser import ExtraNetworkRef, strip_extra_networks
from tests.tiny_models import tiny_pipeline

RANK = 4
ALPHA = 2.0
SD1 = ModelFamily("sd1")


def _kohya_pair(
    state: dict[str, torch.Tensor], key: str, module: torch.nn.Linear, generator: torch.Generator
) -> None:
    state[f"{key}.lora_down.weight"] = torch.randn(RANK, module.in_features, generator=generator) * 0.3
    state[f"{key}.lora_up.weight"] = torch.randn(module.out_features, RANK, generator=generator) * 0.3
    state[f"{key}.alpha"] = torch.tensor(ALPHA)


def kohya_lora(pipe, *, seed: int, unet_suffixes: tuple[str, ...], te_layer: int) -> dict[str, torch.Tensor]:
    """A kohya-layout LoRA whose key names are derived from the tiny model's module names."""
    generator = torch.Generator().manual_seed(seed)
    state: dict[str, torch.Tensor] = {}
    for name, module in pipe.unet.named_modules():
        if name.endswith(unet_suffixes) and "down_blocks" in name:
            _kohya_pair(state, "lora_unet_" + name.replace(".", "_"), module, generator)
    for projection in ("q_proj", "k_proj", "v_proj", "out_proj"):
        name = f"encoder.layers.{te_layer}.self_attn.{projection}"
        # kohya names CLIP's modules as transformers 4 did: with the "text_model." level.
        _kohya_pair(
            state,
            "lora_te_text_model_" + name.replace(".", "_"),
            pipe.text_encoder.get_submodule(name),
            generator,
        )
    return state


@pytest.fixture(scope="module")
def pipe():
    from diffusers import DDIMScheduler

    pipe = tiny_pipeline("sd1")
    # DDIM: one UNet pass per step (the tiny pipeline's PNDM makes three for two steps).
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    return pipe


@pytest.fixture(scope="module")
def lora_dir(tmp_path_factory: pytest.TempPathFactory, pipe) -> Path:
    folder = tmp_path_factory.mktemp("Lora")
    save_file(
        kohya_lora(pipe, seed=1, unet_suffixes=("attn1.to_q", "attn2.to_k", "attn2.to_v"), te_layer=0),
        str(folder / "Film_Grain.safetensors"),
        metadata={"ss_output_name": "filmgrain_v1", "ss_base_model_version": "sd_v1"},
    )
    (folder / "styles").mkdir()
    save_file(
        kohya_lora(pipe, seed=2, unet_suffixes=("attn1.to_v", "attn2.to_q"), te_layer=1),
        str(folder / "styles" / "Ink.safetensors"),
    )
    torch.save(kohya_lora(pipe, seed=3, unet_suffixes=("attn1.to_k",), te_layer=2), folder / "pickled.pt")
    torch.save({"weights": argparse.Namespace(evil=True)}, folder / "unsafe.pt")
    # An SDXL-shaped LoRA: 2048-wide cross-attention and a second text encoder.
    xl_key = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k"
    save_file(
        {
            f"{xl_key}.lora_down.weight": torch.zeros(4, 2048),
            f"{xl_key}.lora_up.weight": torch.zeros(640, 4),
            "lora_te2_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": torch.zeros(4, 1280),
            "lora_te2_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight": torch.zeros(1280, 4),
        },
        str(folder / "xl_detail.safetensors"),
    )
    return folder


def generate(pipe) -> np.ndarray:
    return pipe(
        "a cat",
        num_inference_steps=2,
        height=32,
        width=32,
        generator=torch.Generator().manual_seed(7),
        output_type="np",
    ).images


@pytest.fixture(scope="module")
def baseline(pipe) -> np.ndarray:
    return generate(pipe)


def refs(prompt: str) -> list[ExtraNetworkRef]:
    return strip_extra_networks(prompt)[1]


# --- LoRA ------------------------------------------------------------------------------------------


def test_parse_lora_ref_follows_a1111_argument_order() -> None:
    assert parse_lora_ref(ExtraNetworkRef("lora", "x")).te_weight == 1.0
    plain = parse_lora_ref(ExtraNetworkRef("lora", "x", ("0.7",)))
    assert (plain.te_weight, plain.unet_weight) == (0.7, 0.7)
    split = parse_lora_ref(ExtraNetworkRef("lora", "x", ("0.2", "1.5")))
    assert (split.te_weight, split.unet_weight) == (0.2, 1.5)
    named = parse_lora_ref(ExtraNetworkRef("lora", "x", ("0.5", "unet=0.9")))
    assert (named.te_weight, named.unet_weight) == (0.5, 0.9)
    with pytest.raises(LoraError, match="'abc' is not a number"):
        parse_lora_ref(ExtraNetworkRef("lora", "x", ("abc",)))


def test_lora_changes_output_and_removal_is_bit_identical(pipe, lora_dir: Path, baseline: np.ndarray) -> None:
    original_module = pipe.unet.get_submodule("down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q")
    applied = apply_loras(pipe, refs("a cat <lora:film_grain:1>"), lora_dir=lora_dir)
    try:
        assert applied.adapter_names and set(pipe.get_list_adapters()) == {"unet", "text_encoder"}
        assert np.abs(generate(pipe) - baseline).max() > 1e-3
    finally:
        remove_loras(pipe, applied)
    assert not any(pipe.get_list_adapters().values())
    assert (
        pipe.unet.get_submodule("down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q")
        is original_module
    )
    assert np.array_equal(generate(pipe), baseline)


def test_lora_weights_follow_the_kohya_formula(pipe, lora_dir: Path) -> None:
    """W' = W + weight * alpha / rank * up @ down, with the text encoder and UNet weighted apart."""
    state = load_file(str(lora_dir / "Film_Grain.safetensors"))
    unet_name = "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k"
    te_name = "encoder.layers.0.self_attn.q_proj"
    x_unet = torch.randn(
        3, pipe.unet.get_submodule(unet_name).in_features, generator=torch.Generator().manual_seed(0)
    )
    x_te = torch.randn(3, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        unet_before = pipe.unet.get_submodule(unet_name)(x_unet)
        te_before = pipe.text_encoder.get_submodule(te_name)(x_te)
    applied = apply_loras(pipe, refs("<lora:Film_Grain:0.5:2>"), lora_dir=lora_dir)
    try:
        with torch.no_grad():
            unet_after = pipe.unet.get_submodule(unet_name)(x_unet)
            te_after = pipe.text_encoder.get_submodule(te_name)(x_te)
    finally:
        remove_loras(pipe, applied)

    def delta(prefix: str, x: torch.Tensor, weight: float) -> torch.Tensor:
        down, up = state[f"{prefix}.lora_down.weight"], state[f"{prefix}.lora_up.weight"]
        return weight * ALPHA / RANK * x @ down.T @ up.T

    unet_key = "lora_unet_" + unet_name.replace(".", "_")
    te_key = "lora_te_text_model_" + te_name.replace(".", "_")
    torch.testing.assert_close(unet_after - unet_before, delta(unet_key, x_unet, 2.0), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(te_after - te_before, delta(te_key, x_te, 0.5), atol=1e-5, rtol=1e-4)


def test_two_loras_at_once_and_lookup_rules(pipe, lora_dir: Path, baseline: np.ndarray) -> None:
    # Case-insensitive stem, a file in a subfolder, the kohya alias, and a .pt that passes weights_only.
    applied = apply_loras(
        pipe, refs("<lora:FILM_GRAIN:0.8> <lyco:ink:1> <lora:pickled:1>"), lora_dir=lora_dir
    )
    try:
        assert len(applied.adapter_names) == 3
        assert set(pipe.get_list_adapters()["unet"]) == set(applied.adapter_names)
        both = generate(pipe)
    finally:
        remove_loras(pipe, applied)
    single = apply_loras(pipe, refs("<lora:filmgrain_v1:0.8>"), lora_dir=lora_dir)  # by alias
    try:
        assert single.loras[0].path.name == "Film_Grain.safetensors"
        one = generate(pipe)
    finally:
        remove_loras(pipe, single)
    assert np.abs(both - one).max() > 1e-3 and np.abs(one - baseline).max() > 1e-3
    assert np.array_equal(generate(pipe), baseline)


def test_zero_weight_is_a_no_op_but_still_hashed(pipe, lora_dir: Path, baseline: np.ndarray) -> None:
    applied = apply_loras(pipe, refs("<lora:Film_Grain:0>"), lora_dir=lora_dir)
    try:
        assert applied.adapter_names == [] and len(applied.loras) == 1
        assert np.array_equal(generate(pipe), baseline)
        assert lora_hashes(applied).startswith("Film_Grain: ")
    finally:
        remove_loras(pipe, applied)


def test_missing_lora_names_the_file_and_close_names(pipe, lora_dir: Path) -> None:
    with pytest.raises(LoraNotFoundError) as caught:
        apply_loras(pipe, refs("<lora:film_grian:1>"), lora_dir=lora_dir)
    message = str(caught.value)
    assert str(lora_dir / "film_grian") in message and "Film_Grain" in message
    assert isinstance(caught.value, StudioError)


def test_wrong_family_is_a_clear_error_and_leaves_the_pipeline_clean(pipe, lora_dir: Path) -> None:
    with pytest.raises(LoraError, match=r"'xl_detail' is for SDXL but the loaded checkpoint is SD1\.x"):
        apply_loras(pipe, refs("<lora:Film_Grain:1> <lora:xl_detail:1>"), lora_dir=lora_dir, family=SD1)
    assert not any(pipe.get_list_adapters().values())


def test_unsafe_pickle_is_refused(pipe, lora_dir: Path) -> None:
    with pytest.raises(LoraError, match=r"unsafe\.pt.*refused"):
        apply_loras(pipe, refs("<lora:unsafe:1>"), lora_dir=lora_dir)


def test_lora_hashes_use_the_addnet_hash_in_a1111_infotext_format(pipe, lora_dir: Path) -> None:
    applied = apply_loras(pipe, refs("<lora:Film_Grain:0.5> <lora:ink:0>"), lora_dir=lora_dir)
    remove_loras(pipe, applied)
    data = (lora_dir / "Film_Grain.safetensors").read_bytes()
    (header_length,) = struct.unpack("<Q", data[:8])
    addnet = hashlib.sha256(data[8 + header_length :]).hexdigest()[:12]
    ink = lora_dir / "styles" / "Ink.safetensors"
    ink_bytes = ink.read_bytes()
    ink_hash = hashlib.sha256(ink_bytes[8 + struct.unpack("<Q", ink_bytes[:8])[0] :]).hexdigest()[:12]
    value = lora_hashes(applied)
    assert value == f"Film_Grain: {addnet}, ink: {ink_hash}"
    infotext = build_infotext("a cat", "", {"Steps": 2, LORA_HASHES_KEY: value})
    assert f'Lora hashes: "Film_Grain: {addnet}, ink: {ink_hash}"' in infotext


def test_list_loras_has_the_a1111_api_shape(lora_dir: Path) -> None:
    entries = {entry["name"]: entry for entry in list_loras(lora_dir)}
    assert set(entries) >= {"Film_Grain", "Ink", "pickled", "xl_detail"}
    film = entries["Film_Grain"]
    assert set(film) == {"name", "alias", "path", "metadata"}
    assert film["alias"] == "filmgrain_v1" and film["metadata"]["ss_base_model_version"] == "sd_v1"
    assert entries["pickled"]["metadata"] == {} and entries["Ink"]["alias"] == "Ink"


# --- textual inversion -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def embeddings_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("embeddings")
    generator = torch.Generator().manual_seed(5)
    a1111 = {
        "string_to_token": {"*": 265},
        "string_to_param": {"*": torch.randn(2, 32, generator=generator)},
        "name": "MyEmb",
        "step": 1500,
        "sd_checkpoint": "abcdef1234",
        "sd_checkpoint_name": "tiny-sd1",
    }
    torch.save(a1111, folder / "MyEmb.pt")
    save_file({"emb_params": torch.randn(1, 32, generator=generator)}, str(folder / "bad-hands.safetensors"))
    torch.save({"<learned>": torch.randn(32, generator=generator)}, folder / "diffusers_style.bin")
    torch.save({"<cat>": torch.randn(32, generator=generator)}, folder / "cat.pt")
    save_file(
        {
            "clip_l": torch.randn(2, 32, generator=generator),
            "clip_g": torch.randn(2, 32, generator=generator),
        },
        str(folder / "xl_neg.safetensors"),
    )
    return folder


def encode(pipe, prompt: str, negative: str = "") -> tuple[torch.Tensor, torch.Tensor]:
    embeds = encode_prompts(pipe, [prompt], [negative])
    return embeds.prompt_embeds, embeds.negative_prompt_embeds


def test_embedding_is_picked_up_by_name_only_where_used_and_unloaded(pipe, embeddings_dir: Path) -> None:
    prompt, negative = "a photo of MyEmb", "blurry, bad-hands"
    vocabulary_size = len(pipe.tokenizer)
    before_prompt, before_negative = encode(pipe, prompt, negative)
    before_plain = encode(pipe, "a photo of a dog", "blurry")
    notes: list[str] = []
    tokens = load_embeddings_for_prompt(pipe, prompt, negative, embeddings_dir, notes=notes)
    try:
        assert sorted(tokens) == ["MyEmb", "MyEmb_1", "bad-hands"]
        ids = pipe.tokenizer("a photo of MyEmb")["input_ids"]
        expanded = pipe.tokenizer(pipe.maybe_convert_prompt("a photo of MyEmb", pipe.tokenizer))["input_ids"]
        assert len(expanded) == len(ids) + 1  # two vectors for one word
        vectors = torch.load(embeddings_dir / "MyEmb.pt", weights_only=True)["string_to_param"]["*"]
        rows = pipe.text_encoder.get_input_embeddings().weight[expanded[4:6]]
        torch.testing.assert_close(rows, vectors)

        after_prompt, after_negative = encode(pipe, prompt, negative)
        # CLIP's attention is causal: BOS, "a", "photo", "of" are untouched, the embedding onwards changes.
        assert torch.equal(after_prompt[:, :4], before_prompt[:, :4])
        assert not torch.allclose(after_prompt[:, 4:6], before_prompt[:, 4:6])
        assert not torch.equal(after_negative, before_negative)
        plain = encode(pipe, "a photo of a dog", "blurry")
        assert torch.equal(plain[0], before_plain[0]) and torch.equal(plain[1], before_plain[1])
    finally:
        unload_embeddings(pipe, tokens)
    assert len(pipe.tokenizer) == vocabulary_size
    assert pipe.text_encoder.get_input_embeddings().weight.shape[0] == vocabulary_size
    after_unload = encode(pipe, prompt, negative)
    assert torch.equal(after_unload[0], before_prompt) and torch.equal(after_unload[1], before_negative)
    assert notes == []


def test_embedding_spellings_and_word_boundaries(pipe, embeddings_dir: Path) -> None:
    # "myemb" is the file MyEmb.pt (A1111 matches CLIP's lowercased tokens); "myembroidery" is
    # another word, even though it starts with the name.
    tokens = load_embeddings_for_prompt(pipe, "(myemb:1.2), myembroidery", "", embeddings_dir)
    try:
        assert tokens == ["myemb", "myemb_1"]
        assert pipe.maybe_convert_prompt("myemb", pipe.tokenizer) == "myemb myemb_1"
        assert "myemb" not in pipe.tokenizer.tokenize("myembroidery")
    finally:
        unload_embeddings(pipe, tokens)
    assert load_embeddings_for_prompt(pipe, "nothing here", "", embeddings_dir) == []


def test_embeddings_that_cannot_apply_are_skipped_with_a_note(pipe, embeddings_dir: Path) -> None:
    notes: list[str] = []
    tokens = load_embeddings_for_prompt(
        pipe, "xl_neg, diffusers_style, a cat", "", embeddings_dir, notes=notes
    )
    try:
        assert tokens == ["diffusers_style"]
        assert len(notes) == 2
        assert "'cat' skipped" in notes[0] and "ordinary CLIP word" in notes[0]
        assert "'xl_neg' skipped" in notes[1] and "SDXL" in notes[1]
    finally:
        unload_embeddings(pipe, tokens)


def test_sdxl_embedding_goes_into_both_text_encoders(embeddings_dir: Path) -> None:
    sdxl = tiny_pipeline("sdxl")
    before = encode_prompts(sdxl, ["photo, xl_neg"], [""])
    tokens = load_embeddings_for_prompt(sdxl, "photo, xl_neg", "", embeddings_dir)
    try:
        assert tokens == ["xl_neg", "xl_neg_1"]
        data = load_file(str(embeddings_dir / "xl_neg.safetensors"))
        for tokenizer, encoder, key in (
            (sdxl.tokenizer, sdxl.text_encoder, "clip_l"),
            (sdxl.tokenizer_2, sdxl.text_encoder_2, "clip_g"),
        ):
            ids = tokenizer.convert_tokens_to_ids(tokens)
            torch.testing.assert_close(encoder.get_input_embeddings().weight[ids], data[key])
        after = encode_prompts(sdxl, ["photo, xl_neg"], [""])
        assert not torch.equal(after.prompt_embeds, before.prompt_embeds)
        assert not torch.equal(after.pooled_prompt_embeds, before.pooled_prompt_embeds)
    finally:
        unload_embeddings(sdxl, tokens)
    restored = encode_prompts(sdxl, ["photo, xl_neg"], [""])
    assert torch.equal(restored.prompt_embeds, before.prompt_embeds)
    assert torch.equal(restored.pooled_prompt_embeds, before.pooled_prompt_embeds)


def test_list_embeddings_has_the_a1111_api_shape(embeddings_dir: Path) -> None:
    listing = list_embeddings(embeddings_dir, expected_width=32)
    assert set(listing) == {"loaded", "skipped"}
    assert listing["loaded"]["MyEmb"] == {
        "step": 1500,
        "sd_checkpoint": "abcdef1234",
        "sd_checkpoint_name": "tiny-sd1",
        "shape": 32,
        "vectors": 2,
    }
    assert listing["loaded"]["bad-hands"]["vectors"] == 1 and listing["loaded"]["bad-hands"]["step"] is None
    assert listing["skipped"]["xl_neg"]["shape"] == 64
    assert set(list_embeddings(embeddings_dir)["loaded"]) == {
        "cat",
        "MyEmb",
        "bad-hands",
        "diffusers_style",
        "xl_neg",
    }
