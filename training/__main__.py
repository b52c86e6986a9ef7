"""`python -m training <subcommand> [options]`.

Each subcommand is a module of this package with `main(argv: list[str]) -> int`. Modules are imported only when
their subcommand runs, so `--help` needs no model code, and a subcommand whose module does not exist yet answers
"not implemented yet" with exit code 2. Adding a subcommand means creating its module (and a row below).
"""

from __future__ import annotations

import importlib
import logging
import sys

# name -> (module, one-line help)
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "dataset": ("training.dry_run", "check a dataset TOML; --dry-run decodes every file and reports what is used"),
    "cache-latents": ("training.cache.latents", "encode the dataset's media into latent caches (VAE, CLIP for I2V)"),
    "cache-text": ("training.cache.text", "encode the captions into T5 caches"),
    "train": ("training.train", "train a LoRA from the caches"),
    "convert-lora": ("training.convert_lora", "convert a LoRA between musubi, ComfyUI and diffusers key formats"),
    "init-dit": ("training.init_dit", "write a randomly initialised DiT of any size (for training from scratch)"),
}


def usage() -> str:
    width = max(len(name) for name in SUBCOMMANDS)
    rows = "\n".join(f"  {name:<{width}}  {text}" for name, (_, text) in SUBCOMMANDS.items())
    return (f"usage: python -m training {{{','.join(SUBCOMMANDS)}}} [options]\n\nsubcommands:\n{rows}\n\n"
            "run `python -m training <subcommand> --help` for its options\n")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage(), end="")
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in SUBCOMMANDS:
        print(f"python -m training: unknown subcommand {name!r}\n\n{usage()}", end="", file=sys.stderr)
        return 2
    module_name = SUBCOMMANDS[name][0]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as error:
        if error.name != module_name:
            raise
        print(f"python -m training {name}: not implemented yet", file=sys.stderr)
        return 2
    return int(module.main(rest) or 0)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    raise SystemExit(main())
