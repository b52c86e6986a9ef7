"""Encoding nodes: text (umT5), CLIP vision, VAE encode (IMAGE frames -> LATENT) and decode (LATENT -> IMAGE)."""

from __future__ import annotations

from wan_core.media.layouts import (
    frames_to_wan_video,
    image_to_wan,
    latent_from_comfy,
    latent_to_comfy,
    video_to_image,
)
from wan_core.models.config import DEFAULT_NEGATIVE_PROMPT
from wan_core.sampling.conditioning import encode_clip_images
from wan_core.sampling.pipeline import decode_latents, encode_prompts

from .common import CATEGORY, inp
from .types import CLIP_VISION, IMAGE_EMBEDS, T5, TEXT_EMBEDS, VAE, ImageEmbeds, ModelHandle, TextEmbeds


class WanTunerTextEncode:
    DESCRIPTION = "Encodes the prompt and the negative prompt with umT5."
    CATEGORY = f"{CATEGORY}/encode"
    RETURN_TYPES = (TEXT_EMBEDS,)
    RETURN_NAMES = ("text_embeds",)
    OUTPUT_TOOLTIPS = ("Prompt and negative-prompt embeddings for the sampler.",)
    FUNCTION = "encode"

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {"required": {
            "t5": inp(T5, "umT5 text encoder from the T5 loader."),
            "prompt": inp("STRING", "What the video shows.", multiline=True, default=""),
            "negative_prompt": inp("STRING", "What to steer away from (used when guidance_scale is not 1; empty = "
                                   "the unconditional empty caption). Default: the official Wan negative prompt.",
                                   multiline=True, default=DEFAULT_NEGATIVE_PROMPT),
        }}

    def encode(self, t5: ModelHandle, prompt: str, negative_prompt: str) -> tuple[TextEmbeds]:
        encoder = t5.model.ready()
        # An empty negative prompt is the empty caption (what caption dropout trains as "unconditional"), as an
        # empty CLIPTextEncode is in ComfyUI; it is not "no negative".
        positive, negative = encode_prompts(encoder, [prompt, negative_prompt])
        return (TextEmbeds(positive, negative, prompt, negative_prompt),)


class WanTunerCLIPVisionEncode:
    DESCRIPTION = ("CLIP vision features of the start image (image-to-video, Fun-Control) or of the start and end "
                   "images (first-last-frame).")
    CATEGORY = f"{CATEGORY}/encode"
    RETURN_TYPES = (IMAGE_EMBEDS,)
    RETURN_NAMES = ("image_embeds",)
    OUTPUT_TOOLTIPS = ("Image embeddings for a conditioning node.",)
    FUNCTION = "encode"

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {
            "required": {
                "clip_vision": inp(CLIP_VISION, "CLIP vision model from the CLIP vision loader."),
                "image": inp("IMAGE", "The start image (the first image of the batch is used)."),
                "crop": inp(["none", "center"], "'none' squashes the image to 224x224 as the official Wan code; "
                            "'center' crops the middle square."),
            },
            "optional": {
                "end_image": inp("IMAGE", "The end image, for first-last-frame models only."),
            },
        }

    def encode(self, clip_vision: ModelHandle, image, crop: str, end_image=None) -> tuple[ImageEmbeds]:
        clip = clip_vision.model.ready()
        last = None if end_image is None else image_to_wan(end_image, "end_image")
        features = encode_clip_images(clip, image_to_wan(image, "image"), last, crop=crop)
        return (ImageEmbeds(features.float().cpu()),)


class WanTunerVAEEncode:
    DESCRIPTION = "Encodes video frames (IMAGE, 4n+1 frames) into a Wan video LATENT (works with native nodes)."
    CATEGORY = f"{CATEGORY}/encode"
    RETURN_TYPES = ("LATENT",)
    RETURN_NAMES = ("latent",)
    OUTPUT_TOOLTIPS = ("Video latent [1, 16, (frames-1)/4+1, H/8, W/8].",)
    FUNCTION = "encode"

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {"required": {
            "vae": inp(VAE, "Wan VAE from the VAE loader."),
            "images": inp("IMAGE", "Frames to encode: 4n+1 of them (1, 5, 9, ...), sides multiples of 8."),
        }}

    def encode(self, vae: ModelHandle, images) -> tuple[dict]:
        model = vae.model.ready()
        latents = model.encode(frames_to_wan_video(images, "images").to(model.device))
        return ({"samples": latent_to_comfy(latents)},)


class WanTunerVAEDecode:
    DESCRIPTION = "Decodes a Wan video LATENT into frames (IMAGE)."
    CATEGORY = f"{CATEGORY}/encode"
    RETURN_TYPES = ("IMAGE",)
    RETURN_NAMES = ("images",)
    OUTPUT_TOOLTIPS = ("The decoded frames, [frames, H, W, 3] in [0, 1].",)
    FUNCTION = "decode"

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {"required": {
            "vae": inp(VAE, "Wan VAE from the VAE loader."),
            "latent": inp("LATENT", "Video latent from the sampler, VAE encode or a native Wan node."),
        }}

    def decode(self, vae: ModelHandle, latent: dict) -> tuple:
        model = vae.model.ready()
        frames = decode_latents(model, latent_from_comfy(latent["samples"]).to(model.device))
        return (video_to_image(frames),)
