"""`python -m wan_core.generate`: the generate command (flags in musubi-tuner's names), prompt files and output
writing. `cli.main` reads as the story of one run: parse and check flags, plan the jobs, load models per phase,
encode prompts, denoise, decode, save."""

from wan_core.generate.cli import main

__all__ = ["main"]
