"""The ``vlmkit`` command line: a typer app whose commands live one per module in this package.

The app's group class owns error reporting, so the console script and typer's ``CliRunner`` behave the
same: usage errors and user errors print one ``error:`` line and exit 2, internal errors exit 1.
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Sequence
from typing import TYPE_CHECKING, Annotated, Any

import typer
from typer.core import TyperGroup

if TYPE_CHECKING:
    from typer._click.exceptions import ClickException

from vlmkit import __version__
from vlmkit.cli.ask import ask_command
from vlmkit.cli.build import build_command
from vlmkit.cli.chat import chat_command
from vlmkit.cli.common import EXIT_USER_ERROR, debug_enabled, print_error, report_exception, set_debug
from vlmkit.cli.eval import eval_command
from vlmkit.cli.export import export
from vlmkit.cli.info import info_command
from vlmkit.cli.plan import plan_command
from vlmkit.cli.serve import serve_command
from vlmkit.cli.synth import synth_command
from vlmkit.cli.train import train_command


class VlmkitGroup(TyperGroup):
    """Runs commands in non-standalone mode and turns every failure into one ``error:`` line."""

    def main(  # type: ignore[override]
        self,
        args: Sequence[str] | None = None,
        prog_name: str | None = None,
        complete_var: str | None = None,
        standalone_mode: bool = True,
        **extra: Any,
    ) -> Any:
        if not standalone_mode:
            return super().main(args=args, prog_name=prog_name, complete_var=complete_var,
                                standalone_mode=False, **extra)  # fmt: skip
        set_debug(False)
        sys.exit(self._run(args=args, prog_name=prog_name, complete_var=complete_var, **extra))

    def _run(self, **kwargs: Any) -> int:
        ClickException, NoArgsIsHelpError = _click_exceptions()  # noqa: N806
        try:
            with warnings.catch_warnings():
                if not debug_enabled():
                    warnings.simplefilter("ignore")  # library deprecation chatter is not for CLI users
                result = super().main(standalone_mode=False, **kwargs)
            return result if isinstance(result, int) else 0
        except NoArgsIsHelpError as exc:  # bare `vlmkit`: the help text is the message
            if exc.format_message().strip():
                typer.echo(exc.format_message(), err=True)
            return EXIT_USER_ERROR
        except ClickException as exc:
            print_error(exc.format_message())
            return EXIT_USER_ERROR if exc.exit_code == 2 else exc.exit_code
        except typer.Abort:
            print_error("aborted")
            return 1
        except Exception as exc:
            return report_exception(exc, debug=debug_enabled())


def _click_exceptions() -> tuple[type[ClickException], type[ClickException]]:
    """(ClickException, NoArgsIsHelpError) of the click that typer runs on (vendored since typer 0.2x)."""
    try:
        from typer._click import exceptions
    except ImportError:
        from click import exceptions  # type: ignore[no-redef]  # older typer uses the click package
    no_args = getattr(exceptions, "NoArgsIsHelpError", None) or type("_NeverRaised", (Exception,), {})
    return exceptions.ClickException, no_args


app = typer.Typer(
    cls=VlmkitGroup,
    name="vlmkit",
    help="Compose, run and inspect LLaVA-style vision-language models.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"vlmkit {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    debug: Annotated[
        bool, typer.Option("--debug", help="Show tracebacks for errors (or set VLMKIT_DEBUG=1).")
    ] = False,
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    """Compose, run and inspect LLaVA-style vision-language models."""
    set_debug(debug)


app.command("ask")(ask_command)
app.command("chat")(chat_command)
app.command("build")(build_command)
app.command("info")(info_command)
app.command("export")(export)
app.command("eval")(eval_command)
app.command("synth")(synth_command)
app.command("serve")(serve_command)
app.command("train")(train_command)
app.command("plan")(plan_command)


def main() -> None:
    """Console-script entry point (``vlmkit = vlmkit.cli.main:main``)."""
    app(prog_name="vlmkit")
