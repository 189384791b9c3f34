"""Text conditioning and image-caption data for text-to-image (Stable Diffusion) teachers."""

from typing import Sequence

import torch


def encode_prompts(tokenizer, text_encoder, prompts: Sequence[str]) -> torch.Tensor:
    """Text embeddings exactly as StableDiffusionPipeline.encode_prompt computes them (padded to the tokenizer's
    model_max_length, truncated; attention mask only where the text encoder's config asks for one; no clip_skip)."""
    tokens = tokenizer(list(prompts), padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                       return_tensors="pt")
    device = next(text_encoder.parameters()).device
    use_mask = getattr(text_encoder.config, "use_attention_mask", False)
    attention_mask = tokens.attention_mask.to(device) if use_mask else None
    return text_encoder(tokens.input_ids.to(device), attention_mask=attention_mask)[0]
