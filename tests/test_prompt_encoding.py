"""A1111-style prompt encoding on tiny random-weight SD1 and SDXL pipelines (CPU, seconds)."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from pipelines.prompts.encoding import (
    CHUNK_TOKENS,
    MAX_CHUNKS,
    PromptEmbeddings,
    PromptTooLongError,
    chunk_prompt,
    encode_prompts,
)
from pipelines.prompts.tokenizer import build_clip_tokenizer

HIDDEN = 32
LAYERS = 5


def _text_config() -> Any:
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=49408,
        hidden_size=HIDDEN,
        intermediate_size=37,
        num_attention_heads=4,
        num_hidden_layers=LAYERS,
        max_position_embeddings=77,
        projection_dim=32,
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=49407,
        hidden_act="gelu",
        layer_norm_eps=1e-5,
    )


def _vae() -> Any:
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    return AutoencoderKL(
        block_out_channels=[4, 8],
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D", "DownEncoderBlock2D"],
        up_block_types=["UpDecoderBlock2D", "UpDecoderBlock2D"],
        latent_channels=4,
        norm_num_groups=2,
    )


def _scheduler() -> Any:
    from diffusers import DDIMScheduler

    return DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )


@pytest.fixture(scope="module")
def sd1_pipe() -> Any:
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        block_out_channels=(4, 8),
        layers_per_block=1,
        sample_size=32,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=HIDDEN,
        norm_num_groups=2,
    )
    torch.manual_seed(0)
    text_encoder = CLIPTextModel(_text_config()).eval()
    pipe = StableDiffusionPipeline(
        vae=_vae(),
        text_encoder=text_encoder,
        tokenizer=build_clip_tokenizer(),
        unet=unet,
        scheduler=_scheduler(),
        safety_checker=None,
        feature_extractor=None,
        image_encoder=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def sdxl_pipe() -> Any:
    from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        block_out_channels=(4, 8),
        layers_per_block=1,
        sample_size=32,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=6 * 8 + 32,  # six time ids + pooled text
        cross_attention_dim=2 * HIDDEN,
        norm_num_groups=2,
    )
    torch.manual_seed(0)
    text_encoder = CLIPTextModel(_text_config()).eval()
    torch.manual_seed(1)
    text_encoder_2 = CLIPTextModelWithProjection(_text_config()).eval()
    pipe = StableDiffusionXLPipeline(
        vae=_vae(),
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=build_clip_tokenizer(),
        tokenizer_2=build_clip_tokenizer(pad_token="!"),
        unet=unet,
        scheduler=_scheduler(),
        force_zeros_for_empty_prompt=True,
        add_watermarker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _words(count: int, offset: int = 0) -> str:
    """`count` words that are one CLIP token each and all different, so positions are traceable."""
    vocabulary = ["cat", "dog", "bird", "tree", "house", "river", "stone", "cloud", "red", "blue", "green"]
    return " ".join(vocabulary[(offset + i) % len(vocabulary)] for i in range(count))


def _sd1_plain(pipe: Any, prompt: str) -> torch.Tensor:
    """diffusers' own encoding of one short prompt (77 tokens)."""
    embeds, _ = pipe.encode_prompt([prompt], "cpu", 1, False)
    return embeds


# --- chunking (tokenizer only) ---------------------------------------------------------------


def test_chunk_sizes_follow_75_token_rule(sd1_pipe: Any) -> None:
    tokenizer = sd1_pipe.tokenizer
    assert [len(c.token_ids) for c in chunk_prompt(tokenizer, _words(75))[0]] == [75]
    assert [len(c.token_ids) for c in chunk_prompt(tokenizer, _words(76))[0]] == [75, 1]
    chunks, count = chunk_prompt(tokenizer, _words(200))
    assert [len(c.token_ids) for c in chunks] == [75, 75, 50]
    assert count == 200
    assert [len(c.token_ids) for c in chunk_prompt(tokenizer, "")[0]] == [0]


def test_overflow_backtracks_to_a_recent_comma(sd1_pipe: Any) -> None:
    tokenizer = sd1_pipe.tokenizer
    comma = tokenizer.get_vocab()[",</w>"]
    # Comma at index 70: the 76th token moves the 4 words after it into the next chunk.
    chunks, _ = chunk_prompt(tokenizer, f"{_words(70)}, {_words(10, offset=3)}")
    assert [len(c.token_ids) for c in chunks] == [71, 10]
    assert chunks[0].token_ids[-1] == comma
    # Comma at index 40 is more than 20 tokens back: plain cut at 75.
    chunks, _ = chunk_prompt(tokenizer, f"{_words(40)}, {_words(40, offset=3)}")
    assert [len(c.token_ids) for c in chunks] == [75, 6]


def test_break_starts_a_new_chunk(sd1_pipe: Any) -> None:
    chunks, count = chunk_prompt(sd1_pipe.tokenizer, "a cat BREAK a dog BREAK")
    assert [len(c.token_ids) for c in chunks] == [2, 2]
    assert count == 4
    chunks, _ = chunk_prompt(sd1_pipe.tokenizer, "BREAK a dog")
    assert [len(c.token_ids) for c in chunks] == [0, 2]


def test_chunk_weights_follow_fragments(sd1_pipe: Any) -> None:
    chunks, _ = chunk_prompt(sd1_pipe.tokenizer, "a (red:1.5) [cat]")
    assert chunks[0].weights == [1.0, 1.5, 1 / 1.1]


# --- parity with diffusers -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("prompts", "negatives"),
    [
        (["a photo of a cat"], [""]),
        (["a dog, sitting on a mat: sunny", "x"], ["blurry, low quality", ""]),
    ],
)
def test_plain_prompts_match_diffusers_bitwise_sd1(
    sd1_pipe: Any, prompts: list[str], negatives: list[str]
) -> None:
    expected, expected_negative = sd1_pipe.encode_prompt(prompts, "cpu", 1, True, negative_prompt=negatives)
    embeds = encode_prompts(sd1_pipe, prompts, negatives)
    assert torch.equal(embeds.prompt_embeds, expected)
    assert torch.equal(embeds.negative_prompt_embeds, expected_negative)
    assert embeds.pooled_prompt_embeds is None
    assert embeds.negative_pooled_prompt_embeds is None
    assert set(embeds.as_pipeline_kwargs()) == {"prompt_embeds", "negative_prompt_embeds"}


@pytest.mark.parametrize(
    ("prompts", "negatives"),
    [
        (["a photo of a cat"], [""]),
        (["a dog, sitting on a mat", "x"], ["blurry, low quality", ""]),
    ],
)
def test_plain_prompts_match_diffusers_bitwise_sdxl(
    sdxl_pipe: Any, prompts: list[str], negatives: list[str]
) -> None:
    expected = sdxl_pipe.encode_prompt(prompts, device="cpu", negative_prompt=negatives)
    embeds = encode_prompts(sdxl_pipe, prompts, negatives)
    actual = (
        embeds.prompt_embeds,
        embeds.negative_prompt_embeds,
        embeds.pooled_prompt_embeds,
        embeds.negative_pooled_prompt_embeds,
    )
    for ours, theirs in zip(actual, expected, strict=True):
        assert ours is not None
        assert torch.equal(ours, theirs)
    assert embeds.prompt_embeds.shape == (len(prompts), 77, 2 * HIDDEN)
    assert set(embeds.as_pipeline_kwargs()) == {
        "prompt_embeds",
        "negative_prompt_embeds",
        "pooled_prompt_embeds",
        "negative_pooled_prompt_embeds",
    }


# --- emphasis --------------------------------------------------------------------------------


def test_emphasis_scales_only_the_weighted_token_then_restores_the_mean(sd1_pipe: Any) -> None:
    plain = encode_prompts(sd1_pipe, ["a red cat on a mat"], [""]).prompt_embeds
    weighted = encode_prompts(sd1_pipe, ["a (red:1.5) cat on a mat"], [""]).prompt_embeds
    assert not torch.equal(plain, weighted)
    # Token 2 is "red" (after BOS and "a"). Everything is rescaled by one common factor so the
    # mean is unchanged; "red" additionally carries its 1.5.
    multipliers = torch.ones(77)
    multipliers[2] = 1.5
    scaled = plain * multipliers[None, :, None]
    expected = scaled * (plain.mean() / scaled.mean())
    torch.testing.assert_close(weighted, expected)
    torch.testing.assert_close(weighted.mean(), plain.mean())


def test_emphasis_leaves_negative_and_other_batch_items_untouched(sd1_pipe: Any) -> None:
    plain = encode_prompts(sd1_pipe, ["a red cat", "a dog"], ["ugly", ""])
    weighted = encode_prompts(sd1_pipe, ["a (red) cat", "a dog"], ["ugly", ""])
    assert not torch.equal(plain.prompt_embeds[0], weighted.prompt_embeds[0])
    assert torch.equal(plain.prompt_embeds[1], weighted.prompt_embeds[1])
    assert torch.equal(plain.negative_prompt_embeds, weighted.negative_prompt_embeds)


def test_sdxl_emphasis_changes_hidden_states_but_not_pooled(sdxl_pipe: Any) -> None:
    plain = encode_prompts(sdxl_pipe, ["a red cat"], [""])
    weighted = encode_prompts(sdxl_pipe, ["a (red:1.4) cat"], [""])
    assert not torch.equal(plain.prompt_embeds, weighted.prompt_embeds)
    assert plain.pooled_prompt_embeds is not None
    assert weighted.pooled_prompt_embeds is not None
    assert torch.equal(plain.pooled_prompt_embeds, weighted.pooled_prompt_embeds)


# --- long prompts, padding and BREAK ---------------------------------------------------------


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_200_token_prompt_gives_three_chunks_and_runs_end_to_end(
    request: pytest.FixtureRequest, family: str
) -> None:
    pipe = request.getfixturevalue(f"{family}_pipe")
    embeds = encode_prompts(pipe, [_words(200)], [""])
    features = HIDDEN if family == "sd1" else 2 * HIDDEN
    assert embeds.prompt_embeds.shape == (1, 3 * 77, features)
    assert embeds.negative_prompt_embeds.shape == (1, 3 * 77, features)

    generator = torch.Generator("cpu").manual_seed(0)
    images = pipe(
        **embeds.as_pipeline_kwargs(),
        height=32,
        width=32,
        num_inference_steps=2,
        guidance_scale=5.0,
        generator=generator,
        output_type="np",
    ).images
    assert images.shape == (1, 32, 32, 3)
    assert bool(torch.isfinite(torch.from_numpy(images)).all())


def test_each_chunk_is_encoded_on_its_own(sd1_pipe: Any) -> None:
    prompt = _words(200)
    embeds = encode_prompts(sd1_pipe, [prompt], [""]).prompt_embeds
    words = prompt.split()
    for index in range(3):
        chunk_text = " ".join(words[index * CHUNK_TOKENS : (index + 1) * CHUNK_TOKENS])
        expected = _sd1_plain(sd1_pipe, chunk_text)
        assert torch.equal(embeds[:, index * 77 : (index + 1) * 77], expected)


def test_short_side_is_padded_with_empty_chunks(sd1_pipe: Any) -> None:
    empty = _sd1_plain(sd1_pipe, "")
    embeds = encode_prompts(sd1_pipe, ["a cat"], [_words(100)])
    assert embeds.prompt_embeds.shape == embeds.negative_prompt_embeds.shape == (1, 2 * 77, HIDDEN)
    assert torch.equal(embeds.prompt_embeds[:, :77], _sd1_plain(sd1_pipe, "a cat"))
    assert torch.equal(embeds.prompt_embeds[:, 77:], empty)

    embeds = encode_prompts(sd1_pipe, [_words(100)], [""])
    assert torch.equal(embeds.negative_prompt_embeds[:, :77], empty)
    assert torch.equal(embeds.negative_prompt_embeds[:, 77:], empty)


def test_batch_items_of_different_length_share_a_chunk_count(sd1_pipe: Any) -> None:
    embeds = encode_prompts(sd1_pipe, ["a cat", _words(80)], ["", ""])
    assert embeds.prompt_embeds.shape == (2, 2 * 77, HIDDEN)
    assert torch.equal(embeds.prompt_embeds[0, 77:], _sd1_plain(sd1_pipe, "")[0])


def test_break_encodes_each_part_as_its_own_chunk(sd1_pipe: Any) -> None:
    embeds = encode_prompts(sd1_pipe, ["a cat BREAK a dog"], [""]).prompt_embeds
    assert embeds.shape == (1, 2 * 77, HIDDEN)
    assert torch.equal(embeds[:, :77], _sd1_plain(sd1_pipe, "a cat"))
    assert torch.equal(embeds[:, 77:], _sd1_plain(sd1_pipe, "a dog"))


def test_sdxl_pooled_comes_from_the_first_chunk(sdxl_pipe: Any) -> None:
    embeds = encode_prompts(sdxl_pipe, ["a cat BREAK a dog"], [""])
    _, _, pooled_first, _ = sdxl_pipe.encode_prompt(["a cat"], device="cpu", negative_prompt=[""])
    assert embeds.pooled_prompt_embeds is not None
    assert torch.equal(embeds.pooled_prompt_embeds, pooled_first)


# --- clip skip -------------------------------------------------------------------------------


def test_clip_skip_2_uses_the_penultimate_layer_sd1(sd1_pipe: Any) -> None:
    last = encode_prompts(sd1_pipe, ["a cat"], [""])
    skipped = encode_prompts(sd1_pipe, ["a cat"], [""], clip_skip=2)
    assert not torch.equal(last.prompt_embeds, skipped.prompt_embeds)
    assert not torch.equal(last.negative_prompt_embeds, skipped.negative_prompt_embeds)

    ids = sd1_pipe.tokenizer(["a cat"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        hidden = sd1_pipe.text_encoder(ids, output_hidden_states=True).hidden_states[-2]
        expected = sd1_pipe.text_encoder.final_layer_norm(hidden)
    assert torch.equal(skipped.prompt_embeds, expected)


def test_clip_skip_2_matches_diffusers_clip_skip_1_sdxl(sdxl_pipe: Any) -> None:
    ours = encode_prompts(sdxl_pipe, ["a cat"], [""], clip_skip=2)
    default = encode_prompts(sdxl_pipe, ["a cat"], [""])
    theirs, _, pooled, _ = sdxl_pipe.encode_prompt(["a cat"], device="cpu", negative_prompt=[""], clip_skip=1)
    assert torch.equal(ours.prompt_embeds, theirs)
    assert not torch.equal(ours.prompt_embeds, default.prompt_embeds)
    assert ours.pooled_prompt_embeds is not None
    assert torch.equal(ours.pooled_prompt_embeds, pooled)


@pytest.mark.parametrize("clip_skip", [0, LAYERS + 1])
def test_out_of_range_clip_skip_is_rejected(sd1_pipe: Any, clip_skip: int) -> None:
    with pytest.raises(ValueError, match="clip_skip"):
        encode_prompts(sd1_pipe, ["a cat"], [""], clip_skip=clip_skip)


# --- limits and argument errors ---------------------------------------------------------------


def test_too_long_prompt_names_the_field_and_token_count(sd1_pipe: Any) -> None:
    limit = MAX_CHUNKS * CHUNK_TOKENS
    with pytest.raises(PromptTooLongError, match=rf"^prompt is too long: {limit + 1} tokens") as caught:
        encode_prompts(sd1_pipe, [_words(limit + 1)], [""])
    assert caught.value.field_name == "prompt"
    assert caught.value.token_count == limit + 1
    assert isinstance(caught.value, ValueError)

    with pytest.raises(
        PromptTooLongError, match=rf"^negative_prompt \(batch item 2\) is too long: {limit + 5}"
    ):
        encode_prompts(sd1_pipe, ["a", "b"], ["", _words(limit + 5)])


def test_prompt_at_the_limit_is_accepted(sd1_pipe: Any) -> None:
    embeds: PromptEmbeddings = encode_prompts(sd1_pipe, [_words(MAX_CHUNKS * CHUNK_TOKENS)], [""])
    assert embeds.prompt_embeds.shape == (1, MAX_CHUNKS * 77, HIDDEN)


def test_mismatched_negative_prompt_count_is_rejected(sd1_pipe: Any) -> None:
    with pytest.raises(ValueError, match="negative_prompt"):
        encode_prompts(sd1_pipe, ["a", "b"], [""])
