"""What every command module shares: the :class:`Subcommand` record, reading defaults from the
library's dataclasses, and the model-loading arguments.

Nothing here imports torch: a command's library module (and with it torch) is imported only when
that command's arguments are built or it runs, which keeps ``dpokit --help`` instant.
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Subcommand:
    """One ``dpokit <name>`` command."""

    name: str
    help: str  # one line, shown in ``dpokit --help``
    description: str  # shown at the top of ``dpokit <name> --help``
    epilog: str  # examples, shown at the bottom of ``dpokit <name> --help``
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


def field_default(cls: type, name: str) -> Any:
    """The default of dataclass ``cls``'s field ``name`` -- the one place that default is written."""
    for dataclass_field in dataclasses.fields(cls):
        if dataclass_field.name == name:
            if dataclass_field.default is not dataclasses.MISSING:
                return dataclass_field.default
            if dataclass_field.default_factory is not dataclasses.MISSING:
                return dataclass_field.default_factory()
            raise KeyError(f"{cls.__name__}.{name} has no default")
    raise KeyError(f"{cls.__name__} has no field {name!r}")


def add_model_arguments(parser: argparse.ArgumentParser, *, with_model: bool = True, with_reference: bool = False) -> None:
    """``--model`` (optional), the reference arguments (optional) and the loading options
    (``--dtype``, ``--device``, ``--trust-remote-code``, defaults from :class:`dpokit.models.LoadOptions`)."""
    from dpokit.config import LossConfig
    from dpokit.models import DTYPES, LoadOptions

    group = parser.add_argument_group("model")
    if with_model:
        group.add_argument(
            "--model",
            required=True,
            metavar="PATH",
            help="the policy: a model directory (or hub id), a LoRA adapter directory, or a checkpoint "
            "directory written by `dpokit train`",
        )
    if with_reference:
        group.add_argument(
            "--reference",
            metavar="PATH",
            default=None,
            help="the reference model pi_ref. Default: for a LoRA adapter, its base model with the adapter "
            "disabled; for a `dpokit train` output or checkpoint, the model the run started from",
        )
        group.add_argument(
            "--reference-free",
            action="store_true",
            help="use no reference model (pi_ref uniform): r(x, y) = beta * log pi(y|x)",
        )
        group.add_argument(
            "--beta",
            type=float,
            default=None,
            help=f"the KL weight beta (default: the run's loss.beta, else {field_default(LossConfig, 'beta')})",
        )
    dtype = field_default(LoadOptions, "dtype")
    group.add_argument(
        "--dtype", default=dtype, choices=["auto", *DTYPES], help=f"weights dtype; auto keeps the checkpoint's (default: {dtype})"
    )
    group.add_argument(
        "--device",
        default=field_default(LoadOptions, "device"),
        help="torch device: auto (cuda if available, else cpu), cpu, cuda, cuda:1, ... (default: auto)",
    )
    group.add_argument(
        "--trust-remote-code", action="store_true", help="allow custom model code from the model directory (off by default)"
    )


def add_engine_arguments(parser: argparse.ArgumentParser, *, vllm: str | None = None) -> None:
    """``--engine``, ``--engine-url`` and ``--api-key-env`` (as ``online.sampling.engine``, ``.url`` and
    ``.api_key_env``; defaults from :class:`dpokit.generation.engines.EngineOptions`); ``vllm``: what the
    command needs of the server, when it is not that it serves every model named."""
    from dpokit.generation.engines import ENGINES, EngineOptions

    group = parser.add_argument_group("sampling engine")
    group.add_argument(
        "--engine",
        choices=ENGINES,
        default=field_default(EngineOptions, "engine"),
        help="who samples: dpokit (its own generator, on the model loaded here) or vllm (a running vLLM server at "
        "--engine-url; "
        + (
            vllm
            or "each model must then be one the server serves: its served name, or the directory the server loaded it "
            "from; --dtype/--device do not apply"
        )
        + "). Default: %(default)s",
    )
    group.add_argument("--engine-url", metavar="URL", default=None, help="--engine vllm: the server, e.g. http://127.0.0.1:8000")
    group.add_argument(
        "--api-key-env",
        metavar="VAR",
        default=field_default(EngineOptions, "api_key_env"),
        help="--engine vllm: the environment variable holding the server's API key, if it has one (default: %(default)s)",
    )


def engine_options(args: argparse.Namespace) -> Any:
    """The :class:`dpokit.generation.engines.EngineOptions` of the parsed engine arguments."""
    from dpokit.generation.engines import EngineOptions

    return EngineOptions(engine=args.engine, url=args.engine_url, api_key_env=args.api_key_env)


def load_options(args: argparse.Namespace) -> Any:
    """The :class:`dpokit.models.LoadOptions` of the parsed loading arguments."""
    from dpokit.models import LoadOptions

    return LoadOptions(dtype=args.dtype, device=args.device, trust_remote_code=args.trust_remote_code)


def add_length_arguments(parser: argparse.ArgumentParser, job_cls: type, *, max_length: int, max_prompt_length: int) -> None:
    """``--max-length`` / ``--max-prompt-length`` (None: the run's, else the given fallbacks, which the
    caller reads from the library) and ``--batch-size`` (default: ``job_cls.batch_size``)."""
    group = parser.add_argument_group("tokenization")
    group.add_argument(
        "--max-length",
        type=positive_int,
        default=None,
        help=f"max prompt+response tokens (default: the run's, else {max_length})",
    )
    group.add_argument(
        "--max-prompt-length",
        type=positive_int,
        default=None,
        help=f"max prompt tokens (default: the run's, else {max_prompt_length})",
    )
    batch_size = field_default(job_cls, "batch_size")
    group.add_argument(
        "--batch-size", type=positive_int, default=batch_size, help=f"examples per forward pass (default: {batch_size})"
    )


def positive_int(text: str) -> int:
    """An argparse ``type``: a whole number >= 1 (``--batch-size 0`` is refused with a usage error)."""
    return _int_at_least(text, 1)


def non_negative_int(text: str) -> int:
    """An argparse ``type``: a whole number >= 0 (``--top-k -1`` is refused with a usage error)."""
    return _int_at_least(text, 0)


def _int_at_least(text: str, low: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < low:
        raise argparse.ArgumentTypeError(f"must be at least {low}, got {value}")
    return value
