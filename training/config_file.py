"""`--config_file FILE.toml` for the `python -m training` subcommands (musubi's `read_config_from_file` rules).

The TOML file holds flag values by their dest name (`dataset_config = "x.toml"`, `vae_cache_cpu = true`); tables
are flattened one level, so a file grouped into sections works too. Values from the file become defaults and the
command line overrides them. Keys that this subcommand does not know are ignored with a warning, so one file can
serve several subcommands. `.toml` is appended when the name has no extension, as musubi does.

Because a required flag may come from the file, parsers used here must not mark flags `required=True`; list them
in `required` instead and they are checked after merging.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised only on Python 3.10
    import tomli as tomllib

logger = logging.getLogger(__name__)

CONFIG_FILE_DEST = "config_file"


def add_config_file_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config_file", "--config-file", dest=CONFIG_FILE_DEST, default=None,
                        help="TOML file holding any of these flags by name; the command line overrides it")


def _flatten(data: dict[str, Any]) -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict):
            flat.update(value)
        else:
            flat[key] = value
    return flat


def read_config_file(path: str | Path) -> dict[str, Any]:
    """The flattened key -> value table of a config TOML."""
    path = Path(path)
    if not path.suffix:
        path = path.with_name(path.name + ".toml")
    if not path.is_file():
        raise FileNotFoundError(f"config file not found: {path}")
    try:
        return _flatten(tomllib.loads(path.read_text(encoding="utf-8")))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"config file {path} is not valid TOML: {error}") from error


def _convert(action: argparse.Action, value: Any, source: str) -> Any:
    """A TOML value for one flag, checked like the command line would check it."""
    flag = action.option_strings[0] if action.option_strings else action.dest
    if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
        if not isinstance(value, bool):
            raise ValueError(f"{source}: {action.dest} must be true or false, got {value!r}")
        return value
    if action.nargs in ("*", "+") or isinstance(action.nargs, int):
        values = value if isinstance(value, list) else [value]
        return [_convert_one(action, v, flag, source) for v in values]
    return _convert_one(action, value, flag, source)


def _convert_one(action: argparse.Action, value: Any, flag: str, source: str) -> Any:
    if isinstance(value, (dict, list)):
        raise ValueError(f"{source}: {action.dest} ({flag}) takes a single value, got {value!r}")
    if action.type is not None and isinstance(value, str):
        try:
            value = action.type(value)
        except (TypeError, ValueError, argparse.ArgumentTypeError) as error:
            raise ValueError(f"{source}: {action.dest} = {value!r} is invalid: {error}") from error
    if action.choices is not None and value not in action.choices:
        raise ValueError(f"{source}: {action.dest} = {value!r} is not one of {sorted(action.choices)}")
    return value


def parse_args(parser: argparse.ArgumentParser, argv: Sequence[str] | None,
               required: Sequence[str] = ()) -> argparse.Namespace:
    """Parse `argv` with the values of `--config_file` (if given) as defaults; check `required` dests afterwards.

    Errors (bad file, bad value, a missing required flag) go through `parser.error`, i.e. exit code 2.
    """
    args = parser.parse_args(argv)
    config_path = getattr(args, CONFIG_FILE_DEST, None)
    if config_path:
        try:
            values = read_config_file(config_path)
            actions = {a.dest: a for a in parser._actions if a.dest not in ("help", CONFIG_FILE_DEST)}
            unknown = sorted(set(values) - set(actions))
            if unknown:
                logger.warning("%s: ignoring keys that %s does not take: %s", config_path, parser.prog,
                               ", ".join(unknown))
            defaults = {k: _convert(actions[k], v, str(config_path)) for k, v in values.items() if k in actions}
        except (ValueError, FileNotFoundError) as error:
            parser.error(str(error))
        args = parser.parse_args(argv, namespace=argparse.Namespace(**defaults))
    missing = [dest for dest in required if getattr(args, dest, None) in (None, "")]
    if missing:
        flags = ", ".join(f"--{dest}" for dest in missing)
        parser.error(f"the following arguments are required (on the command line or in --config_file): {flags}")
    return args
