"""Output nodes: save frames as an H.264 mp4 in ComfyUI's output folder, with the UI preview."""

from __future__ import annotations

import logging

from wan_core.media.io import write_video
from wan_core.media.layouts import check_image_frames

from . import comfy_adapter as comfy
from .common import CATEGORY, first_problem, inp, problem

logger = logging.getLogger(__name__)


def check_prefix(prefix: str) -> str:
    """The prefix without surrounding spaces; ValueError when it names no file (empty, or only folders)."""
    cleaned = prefix.strip()
    if not cleaned or cleaned.replace("\\", "/").endswith("/"):
        raise ValueError(f"filename_prefix {prefix!r} names no file: give a file name, optionally after subfolders "
                         "(e.g. WanTuner/video)")
    return cleaned


class WanTunerSaveVideo:
    DESCRIPTION = "Saves frames (IMAGE) as an H.264 mp4 (yuv420p) in the output folder and shows it in the UI."
    CATEGORY = f"{CATEGORY}/output"
    RETURN_TYPES = ("STRING",)
    RETURN_NAMES = ("path",)
    OUTPUT_TOOLTIPS = ("Full path of the saved mp4.",)
    OUTPUT_NODE = True
    FUNCTION = "save"

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {"required": {
            "images": inp("IMAGE", "Frames to save, e.g. from VAE Decode."),
            "fps": inp("INT", "Frame rate of the video (Wan2.1 models are trained at 16 fps).", default=16, min=1,
                       max=120),
            "filename_prefix": inp("STRING", "File name prefix inside the output folder; may contain subfolders. "
                                   "A counter is appended.", default="WanTuner/video"),
            "crf": inp("INT", "Constant quality (lower = better, 17-23 typical); 0 uses a fixed 4 Mbit/s bit rate.",
                       default=0, min=0, max=51),
        }}

    @classmethod
    def VALIDATE_INPUTS(cls, filename_prefix: str | None = None) -> bool | str:
        return first_problem(None if filename_prefix is None else problem(lambda: check_prefix(filename_prefix)))

    def save(self, images, fps: int, filename_prefix: str, crf: int) -> dict:
        prefix = check_prefix(filename_prefix)
        frames = check_image_frames(images, "images")
        target = comfy.output_file(prefix, "mp4", width=frames.shape[2], height=frames.shape[1])
        write_video(frames, target.path, fps, crf=crf or None)
        logger.info("saved %d frames to %s", frames.shape[0], target.path)
        return {"ui": {"images": [target.ui()], "animated": (True,)}, "result": (str(target.path),)}
