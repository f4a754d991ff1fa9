"""What every `ldm` command shares: errors as one `ldm: error: …` line with their exit
codes — the commands' own (`LdmError`), the option parser's, a full disk, Ctrl-C — and
the checks every numeric option passes (finite, within 64 bits)."""

from __future__ import annotations

import functools
import math
import sys
from typing import Any, Callable

import typer
from typer.core import TyperGroup

from ldm_cli.common.files import NO_SPACE
from ldm_cli.common.progress import make_console, setup_logging
from ldm_cli.errors import LdmError, UsageError

try:  # typer vendors its own copy of click from 0.2x on; earlier it uses click itself
    from typer._click import exceptions as click_errors
except ImportError:  # pragma: no cover
    from click import exceptions as click_errors


NO_ARGS_IS_HELP = getattr(click_errors, "NoArgsIsHelpError", ())  # click >= 8.2: `ldm` alone
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130
SEED_DEFAULT = 0
SCHEDULE_TABLE_ROWS = 20  # schedule-plot prints at most this many timesteps; the CSV has all
INT64 = 2**63


def print_error(message: str) -> None:
    """One `ldm: error:` line per line of `message`, never wrapped."""
    for line in message.splitlines() or ["error"]:
        err_console.print(f"ldm: error: {line}", markup=False, highlight=False, soft_wrap=True)


class LdmGroup(TyperGroup):
    """The command group, printing the parser's usage errors in ldm's one-line format."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):  # noqa: ANN001
        try:
            code = super().main(args=args, prog_name=prog_name, complete_var=complete_var, standalone_mode=False,
                                **extra)
        except NO_ARGS_IS_HELP as err:
            console.print(err.ctx.get_help() if err.ctx else str(err), markup=False, highlight=False)
            code = 0
        except click_errors.UsageError as err:  # a missing or unknown option, a bad value
            where = f" (see `{err.ctx.command_path} --help`)" if err.ctx else ""
            print_error(" ".join(err.format_message().split()) + where)
            code = EXIT_USAGE
        except (typer.Abort, KeyboardInterrupt):
            err_console.print("ldm: interrupted", markup=False)
            code = EXIT_INTERRUPTED
        code = code if isinstance(code, int) else 0
        if standalone_mode:
            sys.exit(code)
        return code


console = make_console()
err_console = make_console(stderr=True)


def check_numbers(kwargs: dict[str, Any]) -> None:
    """Every float option finite, every integer option within 64 bits (exit 2 otherwise)."""
    for name, value in kwargs.items():
        for item in value if isinstance(value, (list, tuple)) else [value]:
            flag = "--" + name.rstrip("_").replace("_", "-")
            if isinstance(item, float) and not math.isfinite(item):
                raise UsageError(f"{flag} {item}: must be a finite number")
            if isinstance(item, int) and not isinstance(item, bool) and not -INT64 <= item < INT64:
                raise UsageError(f"{flag} {item}: out of range")


def reports_errors(command: Callable) -> Callable:
    """Turn an `LdmError` (or a full disk) into one `ldm: error: …` line and its exit code."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        setup_logging()
        try:
            check_numbers(kwargs)
            return command(*args, **kwargs)
        except LdmError as err:
            print_error(str(err) or type(err).__name__)
            raise typer.Exit(err.exit_code) from None
        except OSError as err:
            if err.errno not in NO_SPACE:
                raise
            print_error(f"no space left on device{f' writing {err.filename!r}' if err.filename else ''}")
            raise typer.Exit(1) from None
        except KeyboardInterrupt:
            err_console.print("ldm: interrupted", markup=False)
            raise typer.Exit(EXIT_INTERRUPTED) from None

    return wrapper
