"""The `dreamlora` command: registers one command a module and holds the one error boundary."""

from __future__ import annotations

import functools
import os
import sys

import typer




def quiet_libraries() -> None:
    """Keep the terminal for dreamlora's own bars and messages: the libraries' notices are for developers."""
    import logging
    import warnings

    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)  # an optional CPU kernel it would fetch from a hub
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning, module="diffusers")
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    diffusers_logging.set_verbosity_error()
    diffusers_logging.disable_progress_bar()
    transformers_logging.set_verbosity_error()
    transformers_logging.disable_progress_bar()


quiet_libraries()

from dreamlora.errors import DreamLoraError  # noqa: E402  (after the libraries are quieted)

app = typer.Typer(
    name="dreamlora",
    help="DreamBooth + LoRA for Stable Diffusion: photos in, one small .safetensors out.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def error_boundary(command):
    """Turn a DreamLoraError into one red line and exit code 1; DREAMLORA_DEBUG=1 keeps the traceback.

    Anything else is a bug and keeps its traceback.
    """

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except DreamLoraError as exc:
            if os.environ.get("DREAMLORA_DEBUG") == "1":
                raise
            typer.secho(f"error: {exc}", fg=typer.colors.RED, err=True)
            raise typer.Exit(1) from None

    return wrapper


def _register() -> None:
    from . import check_images, eval_cmd, inspect_cmd, priors, sample, train

    for name, module in (("train", train), ("priors", priors), ("sample", sample), ("inspect", inspect_cmd),
                         ("check-images", check_images), ("eval", eval_cmd)):
        app.command(name)(error_boundary(module.command))


_register()


def main() -> None:
    app()


if __name__ == "__main__":
    sys.exit(main())
