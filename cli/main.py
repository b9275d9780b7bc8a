"""The `dreamlora` command: registers one command a module and holds the one error boundary.

Nothing heavy is imported here or by the command modules at import time: `dreamlora --help`, a bad flag
or a missing path answer before torch, diffusers or transformers are loaded (each command imports the
library functions it calls when it runs).
"""

from __future__ import annotations

import functools
import gc
import os
import sys

import typer

from dreamlora.errors import DreamLoraError

app = typer.Typer(
    name="dreamlora",
    help="DreamBooth + LoRA for Stable Diffusion: photos in, one small .safetensors out.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    # Plain click help and usage errors: rich's formatter costs a quarter of a second of imports per call.
    rich_markup_mode=None,
)


def quiet_libraries() -> None:
    """Keep the terminal for dreamlora's own bars and messages: the libraries' notices are for developers.

    Runs when a command starts, not at import. It sets what the libraries read when they are imported
    (their verbosity variables) and imports none of them.
    """
    import logging
    import warnings

    # bitsandbytes, imported by peft, asks `kernels` for an optional CPU kernel from a hub on AVX512-BF16 CPUs; both
    # log why they go without it (untrusted publisher, offline), and bitsandbytes computes without it
    for name in ("bitsandbytes", "kernels"):
        logging.getLogger(name).setLevel(logging.ERROR)
    for name in ("TRANSFORMERS_VERBOSITY", "DIFFUSERS_VERBOSITY"):
        os.environ.setdefault(name, "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning, module="diffusers")
    warnings.filterwarnings("ignore", category=UserWarning, module="transformers")


def error_boundary(command):
    """Turn a DreamLoraError (or a write the disk refused) into one red line and exit code 1; DREAMLORA_DEBUG=1
    keeps the traceback.

    Anything else is a bug and keeps its traceback.
    """

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        quiet_libraries()
        try:
            return command(*args, **kwargs)
        except Exception as exc:
            message = str(exc) if isinstance(exc, DreamLoraError) else disk_failure(exc)
            if message is None or os.environ.get("DREAMLORA_DEBUG") == "1":
                raise
        typer.secho(f"error: {' '.join(message.split())}", fg=typer.colors.RED, err=True)  # one line, always
        raise typer.Exit(1) from None

    return wrapper


def disk_failure(exc: Exception) -> str | None:
    """A full disk, a file-size limit or a read-only folder met by a write the library does not wrap itself
    (a model cache, a library's own file): the user's environment, not a bug, so one line too. Other
    exceptions are bugs and keep their traceback.
    """
    from dreamlora.atomic import WRITE_ERRNOS, as_os_error, write_error

    error = as_os_error(exc)
    if error is None or error.errno not in WRITE_ERRNOS:
        return None
    return write_error(error.filename or "a file", error)


def _register() -> None:
    from . import (check, check_images, convert, eval_cmd, export, extract, finetune, inspect_cmd, merge, priors,
                   push, resize, sample, train)

    for name, module in (("train", train), ("finetune", finetune), ("priors", priors), ("sample", sample),
                         ("inspect", inspect_cmd),
                         ("check-images", check_images), ("eval", eval_cmd), ("check", check), ("convert", convert),
                         ("merge", merge), ("push", push), ("resize", resize), ("extract", extract), ("export", export)):
        app.command(name)(error_boundary(module.command))


_register()


def main() -> None:
    try:
        app()
    finally:
        # The libraries' module graph is large: freezing it spares the interpreter's final collection over
        # it (about 2 s at exit after a training run, measured in benchmarks/README.md).
        gc.freeze()


if __name__ == "__main__":
    sys.exit(main())
