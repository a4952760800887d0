"""The command line: parse arguments, call the library, map errors to exit codes.

Exit codes: 0 ok, 1 a matrix matched --fail-on, 2 input or usage error.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import click

from .errors import AuditError

EXIT_OK, EXIT_FAIL_ON, EXIT_ERROR = 0, 1, 2


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("source")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path),
              help="Output folder (default: reports/<model name>/).")
@click.option("--include", metavar="REGEX", help="Analyse only tensors whose name matches.")
@click.option("--exclude", metavar="REGEX", help="Skip tensors whose name matches.")
@click.option("--device", default="auto", show_default=True, help="auto | cpu | cuda[:i]")
@click.option("--seed", default=0, show_default=True, type=int, help="Seed of the shuffles.")
@click.option("--no-randomize", is_flag=True, help="Skip the correlation-trap analysis.")
@click.option("--trap-rule", default="ww", show_default=True,
              type=click.Choice(["ww", "tw"]),
              help="ww: WeightWatcher's rule; tw: Tracy-Widom 99.9%% above the exact MP edge.")
@click.option("--fix-fingers", default="none", show_default=True,
              type=click.Choice(["none", "clip_xmax"]))
@click.option("--allow-pickle", is_flag=True,
              help="Allow *.bin/*.pt checkpoints (loaded with torch.load(weights_only=True)).")
@click.option("--quiet", "-q", is_flag=True, help="No progress output.")
@click.option("--debug", is_flag=True, help="Show tracebacks on errors.")
def audit_command(source, out, include, exclude, device, seed, no_randomize, trap_rule,
                  fix_fingers, allow_pickle, quiet, debug):
    """Audit the checkpoint SOURCE (a .safetensors file or a model folder)."""
    from .pipeline import audit

    logging.basicConfig(level=logging.DEBUG if debug else logging.WARNING,
                        format="llm-audit: %(levelname)s: %(message)s")
    with _Progress(quiet) as bar:
        result = audit(source, include=include, exclude=exclude, device=device, seed=seed,
                       randomize=not no_randomize, trap_rule=trap_rule, fix_fingers=fix_fingers,
                       allow_pickle=allow_pickle, progress=bar.update)
    out = out or Path("reports") / result.model
    paths = result.write(out)
    s = result.summary
    if not quiet:
        click.echo(f"{s['model']}: {s['matrices_analysed']} matrices, mean alpha "
                   f"{s['mean_alpha']:.3f}, traps {s['total_traps']}, failed "
                   f"{s['matrices_failed']}, skipped {s['tensors_skipped']} "
                   f"({s['elapsed_seconds']:.1f} s)", err=True)
        click.echo(f"reports: {', '.join(str(p) for p in paths)}", err=True)
    return EXIT_OK


class _Progress:
    """A tqdm bar over matrices analysed (stderr); silent with --quiet or when not a tty."""

    def __init__(self, quiet: bool) -> None:
        self.bar = None
        if not quiet and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(unit=" matrices", file=sys.stderr, leave=False)

    def __enter__(self) -> _Progress:
        return self

    def __exit__(self, *exc) -> None:
        if self.bar is not None:
            self.bar.close()

    def update(self, result, nbytes: int) -> None:
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix_str(result.name[-40:])


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--out", type=click.Path(file_okay=False, path_type=Path),
              default=Path("reports/demo"), show_default=True, help="Output folder.")
@click.option("--quiet", "-q", is_flag=True)
@click.pass_context
def demo_command(ctx, out, quiet):
    """Audit a small built-in checkpoint with known answers (no download, no arguments)."""
    from .demo import write_demo_checkpoint

    path = write_demo_checkpoint(out / "llm-audit-demo")
    return ctx.invoke(audit_command, source=str(path), out=out, quiet=quiet)


SUBCOMMANDS = {"demo": demo_command}


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args
    command, prog = audit_command, "llm-audit"
    if args and args[0] in SUBCOMMANDS:
        command, prog = SUBCOMMANDS[args[0]], f"llm-audit {args[0]}"
        args = args[1:]
    try:
        code = command.main(args, prog_name=prog, standalone_mode=False)
    except click.exceptions.Exit as e:
        code = e.exit_code
    except click.ClickException as e:
        click.echo(f"llm-audit: error: {e.format_message()}", err=True)
        code = EXIT_ERROR
    except click.exceptions.Abort:
        click.echo("llm-audit: interrupted", err=True)
        code = 130
    except AuditError as e:
        if debug:
            raise
        click.echo(f"llm-audit: error: {e}", err=True)
        code = EXIT_ERROR
    if argv is None:
        sys.exit(code or 0)
    return code or 0


if __name__ == "__main__":
    main()
