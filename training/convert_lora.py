"""`python -m training convert-lora --input A --output B --target other|default [--diffusers_prefix P]`.

musubi's `convert_lora.py` flags, wrapping `wan_core.lora.formats.convert_lora_file`: any supported LoRA layout
(musubi / sd-scripts, ComfyUI / diffusion-pipe `diffusion_model.*.lora_A/B`, diffusers/PEFT `transformer.*`,
LyCORIS) is read and written as `--target`: `default` (= musubi: `lora_unet_*` + alpha), `other` (= comfyui:
`<prefix>.<module>.lora_A/B.weight`, prefix `diffusion_model`, alpha folded into the weights as musubi does, or kept
with `--keep_alpha`) or `diffusers` (`transformer.<diffusers module>`). The weight delta is unchanged.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from wan_core.lora.formats import convert_lora_file

logger = logging.getLogger(__name__)

TARGETS = ("other", "default", "comfyui", "musubi", "diffusers")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m training convert-lora", description=__doc__.split("\n\n")[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", required=True, help="LoRA file to read (.safetensors or .pth)")
    parser.add_argument("--output", required=True, help="LoRA file to write (.safetensors)")
    parser.add_argument("--target", required=True, choices=TARGETS,
                        help="other/comfyui: diffusion_model.*.lora_A/B; default/musubi: lora_unet_*; diffusers")
    parser.add_argument("--diffusers_prefix", default=None,
                        help="key prefix of the other/diffusers layout (default diffusion_model / transformer; "
                             "'-' for none); also stripped when reading")
    parser.add_argument("--keep_alpha", action="store_true",
                        help="other/diffusers: keep the weights and write .alpha instead of folding alpha in")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if Path(args.output).resolve() == Path(args.input).resolve():
        sys.stderr.write("error: --output must differ from --input\n")
        return 2
    try:
        lora = convert_lora_file(args.input, args.output, args.target, diffusers_prefix=args.diffusers_prefix,
                                 keep_alpha=args.keep_alpha)
    except (ValueError, FileNotFoundError, RuntimeError) as error:
        sys.stderr.write(f"error: {error}\n")
        return 1
    if lora.unmatched:
        sys.stderr.write(f"warning: {len(lora.unmatched)} key(s) of {args.input} could not be converted: "
                         f"{', '.join(lora.unmatched[:10])}\n")
    sys.stdout.write(f"{args.output}\n")
    return 0
