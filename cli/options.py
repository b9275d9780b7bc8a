"""Option types shared by several commands, and the options derived from the library's setting declarations.

`with_settings(SettingsType)` adds one Typer option per declared key (dreamlora.config.setting) to a
command: flag, help, type and choices come from the declaration, so a key is declared exactly once. The
command receives the values the user gave as `settings={"train.steps": 300, ...}` (None: not given).
"""

from __future__ import annotations

import functools
import inspect
import typing
from pathlib import Path
from typing import Annotated, Any, Literal, Optional

import typer

from dreamlora.config import ARGUMENT, Key, default_text, keys

_DECLARED = {k.dotted: k for k in keys()}
# --model and --model-config of the commands that load a model but take no training config (sample, eval, priors)
ModelOpt = Annotated[Optional[str], typer.Option("--model", help=_DECLARED["model.name"].help)]
ModelConfigOpt = Annotated[Optional[str], typer.Option("--model-config", help=_DECLARED["model.single_file_config"].help)]
ResolutionOpt = Annotated[Optional[int], typer.Option("--resolution", help="Image side in pixels (default: the model's).")]
OverwriteOpt = Annotated[bool, typer.Option("--overwrite", help="Replace existing outputs.")]


def parse_list(text: str | None, kind: type, flag: str) -> list | None:
    """'0,1,2' -> [0, 1, 2]; a bad item is a one-line error naming the flag."""
    if text is None:
        return None
    from dreamlora.errors import ConfigError

    try:
        return [kind(item) for item in text.split(",") if item.strip()]
    except ValueError:
        raise ConfigError(f"{flag} takes comma-separated {kind.__name__} values, e.g. 0,1,2 (got {text!r})") from None


def existing_path(path: Path, flag: str) -> Path:
    from dreamlora.errors import ConfigError

    if not path.exists():
        raise ConfigError(f"{flag} '{path}' does not exist. Check the path.")
    return path


# ----------------------------------------------------------------------------------------------
# Options from declarations


PANELS = {"model": "Base model", "data": "Photos and prompts", "prior": "Prior preservation", "lora": "LoRA",
          "train": "Training", "validation": "Validation grids", "output": "Output file"}


def _param_name(key: Key) -> str:
    return "opt_" + key.dotted.replace(".", "__")


def _annotation(key: Key, argument: tuple[str, str] | None = None) -> Any:
    """The Typer annotation of a declared key: every option defaults to None (not given)."""
    hint = key.hint
    origin = typing.get_origin(hint)
    if origin in (typing.Union, __import__("types").UnionType):
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
        origin = typing.get_origin(hint)
    section = key.dotted.partition(".")[0] if "." in key.dotted else None
    panel = f"{PANELS.get(section, section)} (TOML \\[{section}])" if section else None  # \[: a literal bracket
    default = default_text(key)
    common = {"help": key.help + (f" [default: {default}]" if default else ""), "show_default": False,
              "rich_help_panel": panel}
    if key.flag == ARGUMENT:
        metavar, text = argument or (ARGUMENT, key.help)
        return Annotated[Optional[Path], typer.Argument(metavar=metavar, help=text, show_default=False)]
    if origin is list:
        item = typing.get_args(hint)[0]
        if key.meta["repeatable"]:
            return Annotated[Optional[list[item]], typer.Option(key.flag, **common)]
        return Annotated[Optional[str], typer.Option(key.flag, metavar="A,B,...", **common)]
    if origin is Literal:
        return Annotated[Optional[hint], typer.Option(key.flag, **common)]
    if key.meta["path"]:
        return Annotated[Optional[Path], typer.Option(key.flag, **common)]
    return Annotated[Optional[hint], typer.Option(key.flag, **common)]


def with_settings(settings_type: type, skip: tuple[str, ...] = (), argument: tuple[str, str] | None = None):
    """Decorate a command so that every declared key of `settings_type` with a flag becomes one of its options.

    The command gets `settings`: {dotted key: value given or None}; paths arrive as strings. `argument`:
    (metavar, help) of the positional argument where the command names it otherwise (finetune's DATA).
    """
    declared = [k for k in keys(settings_type) if k.flag and k.dotted not in skip]

    def decorate(command):
        hints = typing.get_type_hints(command, include_extras=True)
        own = [p.replace(annotation=hints.get(p.name, p.annotation))
               for p in inspect.signature(command).parameters.values() if p.name != "settings"]
        generated = [inspect.Parameter(_param_name(k), inspect.Parameter.KEYWORD_ONLY, default=None,
                                       annotation=_annotation(k, argument)) for k in declared]
        arguments = [p for p in generated if typing.get_args(p.annotation)[1].__class__.__name__ == "ArgumentInfo"]
        options = [p for p in generated if p not in arguments]

        @functools.wraps(command)
        def wrapper(**kwargs):
            given = {k.dotted: kwargs.pop(_param_name(k)) for k in declared}
            given = {k: str(v) if isinstance(v, Path) else v for k, v in given.items()}
            return command(**kwargs, settings=given)

        parameters = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in arguments + own + options]
        wrapper.__signature__ = inspect.Signature(parameters)
        wrapper.__annotations__ = {p.name: p.annotation for p in parameters}
        return wrapper

    return decorate
