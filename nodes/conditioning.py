"""Conditioning nodes: image-to-video (+ end image), first-last-frame, Fun-Control and Wan2.2 TI2V-5B
image-to-video (the start image as the first latent frame)."""

from __future__ import annotations

from wan_core.media.layouts import image_batch_to_wan, image_to_wan
from wan_core.models.config import TASKS
from wan_core.sampling.conditioning import (
    PATCH,
    PrecomputedCLIP,
    first_frame_size,
    first_last_to_video,
    fun_control,
    image_to_video,
    size_for_image,
    text_image_to_video,
)

from .common import CATEGORY, first_problem, inp, size_inputs, size_problem
from .types import CONDITIONING, IMAGE_EMBEDS, VAE, ImageEmbeds, ModelHandle, WanConditioning

OUTPUTS = (CONDITIONING, "INT", "INT")
OUTPUT_NAMES = ("conditioning", "width", "height")
OUTPUT_TIPS = ("Conditioning for the sampler (its size and length override the sampler's).",
               "Video width used.", "Video height used.")


def _clip(image_embeds: ImageEmbeds | None):
    return None if image_embeds is None else PrecomputedCLIP(image_embeds.features)


def _image(images, what: str):
    return None if images is None else image_to_wan(images, what)


class _SizedNode:
    CATEGORY = f"{CATEGORY}/conditioning"
    RETURN_TYPES = OUTPUTS
    RETURN_NAMES = OUTPUT_NAMES
    OUTPUT_TOOLTIPS = OUTPUT_TIPS
    FUNCTION = "build"

    @classmethod
    def VALIDATE_INPUTS(cls, width: int | None = None, height: int | None = None,
                        length: int | None = None) -> bool | str:
        return first_problem(size_problem(width, height, length))


class WanTunerImageToVideo(_SizedNode):
    DESCRIPTION = ("Image-to-video conditioning: the start image (VAE + CLIP), optionally an end image; the size "
                   "follows the image's aspect ratio.")

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {
            "required": {
                "vae": inp(VAE, "Wan VAE from the VAE loader."),
                "start_image": inp("IMAGE", "The first frame of the video."),
                **size_inputs(),
                "size_from_image": inp("BOOLEAN", "On: the video takes the image's aspect ratio at about "
                                       "width x height pixels (official I2V rule). Off: exactly width x height.",
                                       default=True),
            },
            "optional": {
                "image_embeds": inp(IMAGE_EMBEDS, "CLIP vision embeddings of the start image (Wan2.1 I2V; Wan2.2 "
                                    "I2V-A14B has no CLIP branch: leave it unconnected)."),
                "end_image": inp("IMAGE", "Optional last frame (experimental for non-FLF models; the decoded "
                                 "video gets 4 extra frames at the end)."),
            },
        }

    def build(self, vae: ModelHandle, start_image, width: int, height: int, length: int, size_from_image: bool,
              image_embeds: ImageEmbeds | None = None, end_image=None) -> tuple:
        image = _image(start_image, "start_image")
        if size_from_image:
            height, width = size_for_image(tuple(image.shape[-2:]), width * height)
        cond = image_to_video(vae.model.ready(), _clip(image_embeds), image, length, height, width,
                              end_image=_image(end_image, "end_image"))
        return (WanConditioning(cond, "image-to-video"), width, height)


TI2V = TASKS["ti2v-5B"]
TI2V_STRIDE = TI2V.vae.space_stride  # pixels per latent cell of the Wan2.2 VAE


class WanTunerTI2VImageToVideo(_SizedNode):
    DESCRIPTION = ("Wan2.2 TI2V-5B image-to-video: the start image, encoded by the Wan2.2 VAE, becomes the first "
                   "latent frame of the video (timestep 0 on its tokens); no CLIP. Without this node the 5B model "
                   "does text-to-video.")

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        height, width = TI2V.sizes[0]
        return {"required": {
            "vae": inp(VAE, "The Wan2.2 VAE (wan2.2_vae) from the VAE loader; the Wan2.1 VAE does not fit TI2V-5B."),
            "start_image": inp("IMAGE", "The first frame of the video (scaled to cover the video size and "
                               "centre-cropped)."),
            **size_inputs(default_width=width, default_height=height, default_frames=TI2V.frame_num),
            "size_from_image": inp("BOOLEAN", "On: the video takes the image's aspect ratio at no more than width x "
                                   "height pixels, sides multiples of 32 (official TI2V rule). Off: exactly width x "
                                   "height (multiples of 32).", default=True),
        }}

    def build(self, vae: ModelHandle, start_image, width: int, height: int, length: int,
              size_from_image: bool) -> tuple:
        image = _image(start_image, "start_image")
        if size_from_image:
            height, width = first_frame_size(tuple(image.shape[-2:]), width * height, TI2V_STRIDE * PATCH)
        cond = text_image_to_video(vae.model.ready(), image, length, height, width, spatial=TI2V_STRIDE)
        return (WanConditioning(cond, "TI2V image-to-video"), width, height)


class WanTunerFirstLastFrame(_SizedNode):
    DESCRIPTION = "First-last-frame conditioning (FLF2V models): the video starts and ends on the given images."

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {"required": {
            "vae": inp(VAE, "Wan VAE from the VAE loader."),
            "start_image": inp("IMAGE", "The first frame of the video."),
            "end_image": inp("IMAGE", "The last frame of the video (cover-cropped to the video size)."),
            "image_embeds": inp(IMAGE_EMBEDS, "CLIP vision embeddings of the start AND end image (connect both "
                                "to CLIP Vision Encode)."),
            **size_inputs(default_width=1280, default_height=720),
        }}

    def build(self, vae: ModelHandle, start_image, end_image, image_embeds: ImageEmbeds, width: int, height: int,
              length: int) -> tuple:
        cond = first_last_to_video(vae.model.ready(), _clip(image_embeds), _image(start_image, "start_image"),
                                   _image(end_image, "end_image"), length, height, width)
        return (WanConditioning(cond, "first-last-frame"), width, height)


class WanTunerFunControl(_SizedNode):
    DESCRIPTION = ("Fun-Control conditioning: a control video (depth, pose, edges, ...) and an optional start "
                   "image, for Wan2.1-Fun-Control models.")

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {
            "required": {
                "vae": inp(VAE, "Wan VAE from the VAE loader."),
                "control_video": inp("IMAGE", "Control frames (at least `length` of them), cover-cropped to the "
                                     "video size."),
                **size_inputs(),
            },
            "optional": {
                "start_image": inp("IMAGE", "Optional first frame (reference image)."),
                "image_embeds": inp(IMAGE_EMBEDS, "CLIP vision embeddings of the start image (used with it)."),
            },
        }

    def build(self, vae: ModelHandle, control_video, width: int, height: int, length: int, start_image=None,
              image_embeds: ImageEmbeds | None = None) -> tuple:
        control = image_batch_to_wan(control_video, "control_video")
        cond = fun_control(vae.model.ready(), _clip(image_embeds), control, length, height, width,
                           image=_image(start_image, "start_image"))
        return (WanConditioning(cond, "Fun-Control"), width, height)
