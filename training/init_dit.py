"""`python -m training init-dit --config JSON --output X.safetensors [--seed N] [--dtype fp32]`.

Writes a randomly initialised Wan2.1 DiT of any `DiTConfig` (the official initialisation, `WanModel.init_weights`:
Xavier-uniform Linear and patch-embedding weights, zero biases, N(0, 0.02) text/time embeddings, zero head) with
the config in the `wantuner_config` metadata, so `load_dit` and `python -m training train --dit X` need no shape
guessing. `--config` is JSON text or a .json file with DiTConfig fields (missing fields take the 1.3B defaults);
`--task NAME` takes a preset's architecture instead. `--metadata KEY=VALUE` adds metadata entries (for example
`wantuner_sampling`), which full training carries into the trained file.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

from wan_core.loading.checkpoint import save_safetensors
from wan_core.models.config import CONFIG_METADATA_KEY, TASKS, DiTConfig, config_to_json, get_task
from wan_core.models.dit import WanModel

logger = logging.getLogger(__name__)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def parse_dit_config(text: str) -> DiTConfig:
    """DiTConfig from JSON text or a .json file; unknown fields are an error."""
    path = Path(text)
    if path.suffix == ".json":
        if not path.is_file():
            raise FileNotFoundError(f"--config {path}: no such file")
        text = path.read_text(encoding="utf-8")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(f"--config is neither a .json file nor JSON text ({error}): {text[:80]!r}") from None
    if not isinstance(data, dict):
        raise ValueError(f"--config must be a JSON object of DiTConfig fields, got {type(data).__name__}")
    data.pop("class", None)
    fields = {f.name for f in dataclasses.fields(DiTConfig)}
    unknown = sorted(set(data) - fields)
    if unknown:
        raise ValueError(f"--config: unknown DiTConfig field(s) {', '.join(unknown)}; known: "
                         f"{', '.join(sorted(fields))}")
    return DiTConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items()})


def init_dit(config: DiTConfig, seed: int = 0, dtype: torch.dtype = torch.float32) -> WanModel:
    """A freshly initialised DiT (official init), seeded."""
    torch.manual_seed(seed)
    model = WanModel(config)
    model.init_weights()
    return model.to(dtype)


def write_dit(model: WanModel, path: str | Path, metadata: dict[str, str] | None = None) -> Path:
    meta = {**(metadata or {}), CONFIG_METADATA_KEY: config_to_json(model.config)}
    return save_safetensors(model.state_dict(), path, meta)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m training init-dit", description=__doc__.split("\n\n")[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--config", help="DiTConfig as JSON text or a .json file")
    source.add_argument("--task", choices=sorted(TASKS), help="use this task's architecture")
    parser.add_argument("--output", required=True, help="safetensors file to write")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    parser.add_argument("--metadata", nargs="*", default=[], help="extra KEY=VALUE metadata entries")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        config = parse_dit_config(args.config) if args.config else get_task(args.task).dit
        metadata = {}
        for item in args.metadata:
            key, sep, value = item.partition("=")
            if not sep or not key:
                raise ValueError(f"--metadata takes KEY=VALUE items, got {item!r}")
            metadata[key] = value
        model = init_dit(config, args.seed, DTYPES[args.dtype])
        path = write_dit(model, args.output, metadata)
    except (ValueError, FileNotFoundError, TypeError) as error:
        sys.stderr.write(f"error: {error}\n")
        return 2
    logger.info("wrote %s (%.1fM parameters)", path, sum(p.numel() for p in model.parameters()) / 1e6)
    sys.stdout.write(f"{path}\n")
    return 0
