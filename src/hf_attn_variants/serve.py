"""`hf-attn-variants serve MODEL`: transformers' own OpenAI-compatible server (`transformers serve`) for the family.

`transformers serve` loads a model with `getattr(transformers, config.architectures[0])`, which fails for any class
outside transformers. `make_resolvable` puts the family's classes on the `transformers` module first:

- by default the installed package's classes (importing it registers the family with the Auto classes, so no remote
  code has to be trusted);
- with `--trust-remote-code`, the checkpoint's own code (its `auto_map`, loaded with transformers' public
  `get_class_from_dynamic_module`), as `AutoModelForCausalLM.from_pretrained(..., trust_remote_code=True)` would.

Everything else (endpoints, flags, continuous batching) is transformers' own: the flags are parsed by its `serve`
command, so they stay in sync with the installed transformers.
"""

import importlib.util
import os
import re
import socket

import transformers
from transformers import AutoConfig
from transformers.dynamic_module_utils import get_class_from_dynamic_module

from . import models
from .models import AttnVariantLlamaConfig

# `org/name` or `name`, optionally `@revision`: what `transformers serve` accepts as a Hub model (GGUF `repo:file`
# names are left out: the family has no GGUF checkpoints).
HUB_ID = re.compile(r"^(?:[\w.-]+/)?[\w.-]+(?:@[\w./-]+)?$")
# What `transformers serve` imports beyond transformers (its `serving` extra; `is_serve_available` is not in 5.4).
SERVE_PACKAGES = ("fastapi", "uvicorn", "pydantic", "openai")
# `transformers serve` binds to "localhost"; a server started from this package listens on loopback only by default.
DEFAULT_HOST = "127.0.0.1"


class ServeError(Exception):
    """Bad input for `serve`: printed as one line, exit status 2."""


def split_model(model: str) -> tuple[str, str | None]:
    """(folder or Hub id, revision) of MODEL; a one-line `ServeError` if it is neither an existing folder with a
    config.json nor something shaped like a Hub id."""
    if os.path.exists(model):
        if not os.path.isfile(os.path.join(model, "config.json")):
            raise ServeError(f"MODEL {model!r} is not a model folder (no config.json in it)")
        return model, None  # an `@` in a local path is part of the path, as transformers serve reads it
    if model.startswith((".", "/", "~")) or not HUB_ID.match(model):
        raise ServeError(f"MODEL {model!r} is neither an existing folder nor a Hub id (org/name[@revision])")
    repo, _, revision = model.partition("@")
    return repo, revision or None


def family_classes(model: str, trust_remote_code: bool = False) -> dict[str, type]:
    """{architecture name: class} that `transformers serve` must find on the transformers module to load MODEL;
    empty for models outside the family (transformers serves them as it is)."""
    repo, revision = split_model(model)
    try:
        config = AutoConfig.from_pretrained(repo, revision=revision, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as error:
        raise ServeError(f"cannot read the config of {model!r}: {str(error).strip().splitlines()[0]}") from error
    if config.model_type != AttnVariantLlamaConfig.model_type:
        return {}
    auto_map = getattr(config, "auto_map", None) or {}
    classes = {}
    for name in config.architectures or ["AttnVariantLlamaForCausalLM"]:
        reference = next((ref for ref in auto_map.values() if isinstance(ref, str) and ref.endswith(f".{name}")), None)
        if trust_remote_code and reference is not None:
            classes[name] = get_class_from_dynamic_module(reference, repo, revision=revision)
        elif hasattr(models, name):
            classes[name] = getattr(models, name)
        else:
            raise ServeError(f"{model!r} names architecture {name!r}, which this package does not have")
    return classes


def make_resolvable(model: str, trust_remote_code: bool = False) -> list[str]:
    """Set the family's classes of MODEL as attributes of the `transformers` module; returns their names."""
    classes = family_classes(model, trust_remote_code)
    for name, cls in classes.items():
        setattr(transformers, name, cls)
    return list(classes)


def serve_command():
    """transformers' own `serve` command (a click command), with this package's defaults: MODEL required, loopback."""
    import typer

    from transformers.cli.serve import Serve

    app = typer.Typer(add_completion=False)
    app.command(name="serve")(Serve)
    command = typer.main.get_command(app)
    for param in command.params:
        if param.name == "force_model":
            param.required, param.metavar = True, "MODEL"
        elif param.name == "host":
            param.default = DEFAULT_HOST
    return command


def check_port_free(host: str, port: int) -> None:
    """Fail in one line before loading the model, rather than after it, when the address is taken."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds: TIME_WAIT is no conflict
        try:
            probe.bind((host, port))
        except OSError as error:
            raise ServeError(f"cannot listen on {host}:{port}: {error.strerror or error}") from error


def main(argv: list[str]) -> int:
    """Parse `transformers serve` flags from argv, make MODEL's family classes resolvable, run the server (blocks).

    Returns 0 after --help or a clean shutdown; raises `ServeError` for bad input.
    """
    import typer

    try:  # recent typer vendors click as typer._click (its exceptions are not re-exported), older typer uses click
        from typer._click.exceptions import ClickException
    except ImportError:
        from click.exceptions import ClickException

    command = serve_command()
    try:
        context = command.make_context("hf-attn-variants serve", list(argv))
    except typer.Exit as done:  # --help
        return done.exit_code
    except ClickException as error:
        raise ServeError(error.format_message().strip().splitlines()[0]) from error
    params = context.params
    make_resolvable(params["force_model"], params["trust_remote_code"])
    check_port_free(params["host"], params["port"])
    missing = [name for name in SERVE_PACKAGES if importlib.util.find_spec(name) is None]
    if missing:
        raise ServeError(f"serving needs {', '.join(missing)}: pip install \"hf-attn-variants[serve]\"")
    with context:
        command.invoke(context)
    return 0
