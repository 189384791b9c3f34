"""Image-caption data encoded once by the teacher: latents and text embeddings equal fresh encodings, are read back
from the cache without touching the VAE, and are encoded again when anything they depend on changes."""

import json

import numpy as np
import pytest
import torch
from PIL import Image
from tiny_sd import tiny_sd_components

from diffusers_pd.data import image_transform
from diffusers_pd.text_image_data import (
    drop_captions,
    encode_prompts,
    encode_text_image_dataset,
    load_text_image_dataset,
    write_captioned_imagefolder,
)

CAPTIONS = ["a photo of a bag", "a photo of a dress", "a photo of a bag", "a photo of a shirt", "a photo of a sneaker"]


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    return tiny_sd_components(tmp_path_factory.mktemp("vocab"), seed=0)


@pytest.fixture
def caption_folder(tmp_path):
    """An imagefolder of five PNGs of different sizes with their captions in metadata.jsonl."""
    folder = tmp_path / "captioned"
    folder.mkdir()
    rng = np.random.default_rng(0)
    with open(folder / "metadata.jsonl", "w") as handle:
        for i, caption in enumerate(CAPTIONS):
            pixels = rng.integers(0, 256, size=(18 + 2 * i, 20, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(folder / f"{i}.png")
            handle.write(json.dumps({"file_name": f"{i}.png", "text": caption}) + "\n")
    return folder


def encode(dataset, teacher, **kwargs):
    return encode_text_image_dataset(dataset, image_column="image", caption_column="text", vae=teacher["vae"],
                                     tokenizer=teacher["tokenizer"], text_encoder=teacher["text_encoder"], **kwargs)


def test_encodings_equal_the_vae_and_text_encoder_and_the_cache_reads_them_back(caption_folder, teacher, tmp_path):
    dataset, image_column, caption_column = load_text_image_dataset(train_data_dir=str(caption_folder))
    assert (image_column, caption_column) == ("image", "text")
    cache = tmp_path / "cache" / "encoded.safetensors"
    encoded = encode(dataset, teacher, resolution=16, batch_size=2, seed=5, cache_path=cache)

    # latents: the VAE's latent_dist sample (same generator, same batches) times scaling_factor
    vae = teacher["vae"]
    transform = image_transform(16, 3, center_crop=True)
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        expected = torch.cat([
            vae.encode(torch.stack([transform(dataset[j]["image"]) for j in range(i, min(i + 2, 5))])).latent_dist.sample(generator=generator)
            for i in range(0, 5, 2)]) * vae.config.scaling_factor
    assert encoded.latents.shape == (5, 4, 8, 8)
    torch.testing.assert_close(encoded.latents, expected, atol=1e-6, rtol=0)
    # text: each image's caption through the pipeline's own encode_prompt
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline(**teacher)
    with torch.no_grad():
        reference, _ = pipe.encode_prompt(CAPTIONS, "cpu", 1, False)
        empty, _ = pipe.encode_prompt([""], "cpu", 1, False)
    latents, embeddings = encoded.batch(range(5))
    assert torch.equal(latents, encoded.latents) and encoded.caption_embeddings.shape[0] == 4  # 4 distinct captions
    torch.testing.assert_close(embeddings, reference, atol=1e-6, rtol=0)
    torch.testing.assert_close(encoded.empty_embedding, empty[0], atol=1e-6, rtol=0)
    with torch.no_grad():
        assert torch.equal(encode_prompts(teacher["tokenizer"], teacher["text_encoder"], CAPTIONS), reference)

    # the cache gives the same tensors without calling the VAE or the text encoder
    calls = []
    hooks = [vae.register_forward_pre_hook(lambda *_: calls.append("vae")),
             teacher["text_encoder"].register_forward_pre_hook(lambda *_: calls.append("text"))]
    original_encode = vae.encode
    vae.encode = lambda *args, **kwargs: calls.append("encode") or original_encode(*args, **kwargs)
    try:
        cached = encode(dataset, teacher, resolution=16, batch_size=2, seed=5, cache_path=cache)
        assert calls == []
        for name, tensor in encoded.tensors().items():
            assert torch.equal(cached.tensors()[name], tensor), name
        # anything the encodings depend on changes the key: encoded again (and the file rewritten)
        again = encode(dataset, teacher, resolution=16, batch_size=2, seed=6, cache_path=cache)
        assert "encode" in calls and not torch.equal(again.latents, encoded.latents)
    finally:
        vae.encode = original_encode
        for hook in hooks:
            hook.remove()
    assert not [p for p in cache.parent.iterdir() if p.name.startswith(".")]  # atomic: no temporary file left


def test_proportion_empty_prompts_drops_captions_per_batch():
    embeddings, empty = torch.randn(4000, 3, 2), torch.randn(3, 2)
    dropped = drop_captions(embeddings, empty, proportion=0.25, generator=torch.Generator().manual_seed(0))
    is_empty = (dropped == empty).all(dim=(1, 2))
    kept = (dropped == embeddings).all(dim=(1, 2))
    assert torch.all(is_empty ^ kept) and abs(is_empty.float().mean().item() - 0.25) < 0.03
    assert torch.equal(drop_captions(embeddings, empty, proportion=0.0), embeddings)
    with pytest.raises(ValueError, match="proportion_empty_prompts"):
        drop_captions(embeddings, empty, proportion=1.5)


def test_bad_input(caption_folder, teacher, tmp_path):
    with pytest.raises(ValueError, match="caption column 'caption' not found.*--caption_column"):
        load_text_image_dataset(train_data_dir=str(caption_folder), caption_column="caption")
    dataset, _, _ = load_text_image_dataset(train_data_dir=str(caption_folder))
    with pytest.raises(ValueError, match="--resolution 15 is not a multiple of the VAE's downsampling factor 2"):
        encode(dataset, teacher, resolution=15, cache_path=tmp_path / "never.safetensors")
    with pytest.raises(ValueError, match="row 1 of caption column 'text' holds None: a text-to-image teacher needs a caption"):
        encode(dataset.map(lambda row, i: {"text": None if i == 1 else row["text"]}, with_indices=True), teacher, resolution=16)
    assert not (tmp_path / "never.safetensors").exists()


def test_a_list_of_captions_gives_one_of_them_drawn_by_the_seed():
    import random

    from diffusers_pd.text_image_data import pick_caption

    picks = {pick_caption(["a bag", "a dress"], 0, "text", random.Random(seed)) for seed in range(20)}
    assert picks == {"a bag", "a dress"}
    assert pick_caption("a shirt", 0, "text", random.Random(0)) == "a shirt"
    with pytest.raises(ValueError, match="row 3 of caption column 'text' holds \\[\\]"):
        pick_caption([], 3, "text", random.Random(0))


def test_written_captioned_imagefolder_reads_back_the_same_pixels_and_captions(tmp_path):
    rng = np.random.default_rng(1)
    images = [Image.fromarray(rng.integers(0, 256, size=(28, 28), dtype=np.uint8), "L") for _ in CAPTIONS]
    folder = write_captioned_imagefolder(tmp_path / "data", images, CAPTIONS)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]  # no staging folder left behind
    dataset, image_column, caption_column = load_text_image_dataset(train_data_dir=str(folder))
    assert dataset[caption_column] == CAPTIONS
    for image, written in zip(dataset[image_column], images):
        np.testing.assert_array_equal(np.asarray(image), np.asarray(written))
    with pytest.raises(ValueError, match="one caption per image"):
        write_captioned_imagefolder(tmp_path / "bad", images, CAPTIONS[:-1])
    assert not (tmp_path / "bad").exists()


def test_written_clip_vocab_makes_each_caption_word_one_token(tmp_path):
    from transformers import CLIPTokenizer

    from diffusers_pd.clip_vocab import caption_words, write_clip_vocab

    captions = ["a photo of a t-shirt/top", "a photo of a ankle boot", "a photo of a sneaker"]
    words = caption_words(captions)
    assert words == ["a", "photo", "of", "t", "-", "shirt", "/", "top", "ankle", "boot", "sneaker"]
    tokenizer = CLIPTokenizer.from_pretrained(write_clip_vocab(tmp_path, words), model_max_length=16)
    expected = {"a photo of a t-shirt/top": "a photo of a t - shirt / top", "a photo of a ankle boot": None,
                "a photo of a sneaker": None}
    for caption in captions:
        pieces = (expected[caption] or caption).split()
        assert tokenizer.tokenize(caption) == [piece + "</w>" for piece in pieces]
    assert len(tokenizer.tokenize("sneakers")) > 1  # an unlisted word falls back to smaller pieces
    with pytest.raises(ValueError, match="lower-case"):
        write_clip_vocab(tmp_path / "bad", ["Sneaker"])
