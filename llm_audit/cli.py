"""The command line: parse arguments, call the library, map errors to exit codes.

Exit codes: 0 ok, 1 a matrix matched --fail-on, 2 input or usage error.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import click

from .errors import AuditError, UsageError
from .options import cli_flags, from_cli
from .safetext import terminal

if TYPE_CHECKING:
    from .summary import AuditSummary

EXIT_OK, EXIT_FAIL_ON, EXIT_ERROR = 0, 1, 2
MAX_FAIL_LINES = 20
ONE_LINE_MAX = 600  # characters of one message line (untrusted names are echoed in them)
ALL_FORMATS = "md,html,csv,json"
_CTX = {"help_option_names": ["-h", "--help"]}


def _audit_options(f):
    """Options shared by `llm-audit`, `diff` and `repair`: AuditOptions' fields (declared once,
    in options.py) and the flags of the command line itself."""
    decos = [click.option(flag, **kw) for _, flag, kw in cli_flags()]
    decos += [
        click.option("--allow-pickle", is_flag=True,
                     help="Allow *.bin/*.pt/*.pth checkpoints (loaded with "
                          "torch.load(weights_only=True))."),
        click.option("--format", "formats", default=ALL_FORMATS, show_default=True,
                     metavar="LIST", help="Outputs to write, comma-separated: md,html,csv,json."),
        click.option("--quiet", "-q", is_flag=True, help="No progress output."),
        click.option("--debug", is_flag=True, help="Show tracebacks on errors."),
    ]
    for deco in reversed(decos):
        f = deco(f)
    return f


def _setup_logging(debug: bool) -> None:
    logging.basicConfig(level=logging.DEBUG if debug else logging.WARNING,
                        format="llm-audit: %(levelname)s: %(message)s")


def _options(kw: dict) -> dict:
    return from_cli(kw)


@click.command(context_settings=_CTX)
@click.argument("source")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path),
              help="Output folder (default: reports/<model name>/).")
@_audit_options
@click.option("--fail-on", metavar="EXPR",
              help="Exit 1 if a matrix matches, e.g. 'rand_num_spikes>0,alpha<2' (',' = or).")
@click.option("--resume", is_flag=True,
              help="Continue an interrupted audit in --out without recomputing finished matrices.")
@click.option("--log-json", type=click.Path(dir_okay=False, path_type=Path), metavar="FILE",
              help="Write JSON lines (start, one per matrix, end) to FILE.")
@click.option("--plan", "plan_only", is_flag=True,
              help="Only print what would be analysed, downloaded and skipped, and the "
                   "estimated time, from headers alone; write OUT/plan.json.")
def audit_command(source, out, fail_on, resume, log_json, plan_only=False, **kw):
    """Audit the checkpoint SOURCE (a .safetensors file or a model folder)."""
    if plan_only:
        return _plan_command(source, out, kw)
    from .failon import find_matches, parse_fail_on
    from .journal import discard_journal
    from .pipeline import audit, default_out
    from .progress import JsonLog, ProgressBar, fan_out
    from .report import parse_formats
    from .spectra import MAX_SPECTRA

    _setup_logging(kw["debug"])
    formats = parse_formats(kw["formats"])
    conditions = parse_fail_on(fail_on) if fail_on else ()
    out = out or default_out(source)
    if log_json:
        _refuse_input(log_json, source, "--log-json")
    with contextlib.ExitStack() as stack:
        bar = None if kw["quiet"] or not sys.stderr.isatty() else stack.enter_context(
            ProgressBar())
        jlog = stack.enter_context(JsonLog(log_json)) if log_json else None
        result = audit(source, allow_pickle=kw["allow_pickle"], progress=fan_out(bar, jlog),
                       workdir=out, resume=resume,
                       max_spectra=MAX_SPECTRA if {"md", "html"} & set(formats) else 0,
                       **_options(kw))
        paths = result.write(out, formats)
        discard_journal(out)
        if not kw["quiet"]:
            _echo_summary(result.summary, paths)
        matches = find_matches(result.details, conditions)
        for m in matches[:MAX_FAIL_LINES]:
            click.echo(f"llm-audit: fail-on: {terminal(m, ONE_LINE_MAX)}", err=True)
        if len(matches) > MAX_FAIL_LINES:
            click.echo(f"llm-audit: fail-on: ... and {len(matches) - MAX_FAIL_LINES} more",
                       err=True)
        code = EXIT_FAIL_ON if matches else EXIT_OK
        if jlog is not None:
            jlog.end(result.summary, code)
    return code


def _plan_command(source: str, out: Path | None, kw: dict) -> int:
    """--plan: headers only, nothing downloaded but config.json; the table on stdout."""
    from .options import AuditOptions
    from .pipeline import default_out
    from .plan_report import plan_lines, plan_source

    _setup_logging(kw["debug"])
    plan = plan_source(source, AuditOptions(**_options(kw)))
    path = plan.write(out or default_out(source))
    for line in plan_lines(plan):
        click.echo(terminal(line, ONE_LINE_MAX))
    click.echo(f"plan: {path}")
    return EXIT_OK


def _refuse_input(path: Path, source: str, flag: str) -> None:
    """An output file must not be the checkpoint (or a file of the checkpoint's folder)."""
    src = Path(source)
    if not src.exists():
        return
    p, s = path.resolve(), src.resolve()
    if p == s or (s.is_dir() and p.exists() and p.is_relative_to(s)):
        raise UsageError(f"{flag} {path}: is a file of the checkpoint being audited ({source}); "
                         "writing it would destroy the input; choose another path")


def _echo_summary(s: AuditSummary, paths: list[Path]) -> None:
    traps = "n/a" if s.total_traps is None else s.total_traps
    click.echo(f"{terminal(s.model, 100)}: {s.matrices_analysed} matrices, mean alpha "
               f"{s.mean_alpha:.3f}, traps {traps}, failed {s.matrices_failed}, "
               f"skipped {s.tensors_skipped} ({s.elapsed_seconds:.1f} s)", err=True)
    click.echo(f"reports: {', '.join(str(p) for p in paths)}", err=True)


@click.command(context_settings=_CTX)
@click.option("--out", type=click.Path(file_okay=False, path_type=Path),
              default=Path("reports/demo"), show_default=True, help="Output folder.")
@_audit_options
@click.pass_context
def demo_command(ctx, out, **kw):
    """Audit a small built-in checkpoint with known answers (no download, no arguments);
    takes the audit options like any source."""
    from .demo import write_demo_checkpoint

    path = write_demo_checkpoint(out / "llm-audit-demo")
    return ctx.forward(audit_command, source=str(path), out=out, **kw)


@click.command(context_settings=_CTX)
@click.argument("a")
@click.argument("b")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path),
              default=Path("reports/diff"), show_default=True, help="Output folder.")
@_audit_options
def diff_command(a, b, out, **kw):
    """Compare A and B (checkpoints, or folders of earlier audits holding layers.csv):
    per-matrix change of alpha, traps and log_norm, biggest changes first."""
    from .diff import diff
    from .report import parse_formats

    _setup_logging(kw["debug"])
    formats = parse_formats(kw["formats"])
    result = diff(a, b, allow_pickle=kw["allow_pickle"], **_options(kw))
    paths = result.write(out, formats)
    if not kw["quiet"]:
        s = result.summary
        click.echo(f"{terminal(s['a'], 100)} -> {terminal(s['b'], 100)}: {s['matched']} matched, "
                   f"{s['only_a']} only in A, "
                   f"{s['only_b']} only in B; mean dalpha {s['mean_d_alpha']:.3f}, "
                   f"dtraps {s['total_d_traps']}", err=True)
        click.echo(f"reports: {', '.join(str(p) for p in paths)}", err=True)
    return EXIT_OK


@click.command(context_settings=_CTX)
@click.argument("source")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="Folder for the repaired checkpoint (never inside SOURCE).")
@click.option("--method", default="clip", show_default=True,
              type=click.Choice(["clip", "subtract"]),
              help="clip: winsorize the trap entries to the bulk scale; subtract: remove each "
                   "trap's rank-1 component of the shuffled matrix.")
@click.option("--classes", default="entries,tail", show_default=True, metavar="LIST",
              help="Trap classes to remove, comma-separated from mean,entries,tail.")
@_audit_options
def repair_command(source, out, method, classes, **kw):
    """Write SOURCE (a local checkpoint) to --out without its correlation traps, re-audit it,
    and write --out/repair.csv."""
    from .trap_repair import describe, parse_classes, repair

    _setup_logging(kw["debug"])
    result = repair(source, out, method=method, classes=parse_classes(classes),
                    **_options(kw))
    if not kw["quiet"]:
        click.echo(f"{describe(result.table)}; {out / 'repair.csv'}", err=True)
    return EXIT_OK


@click.command(context_settings=_CTX)
@click.argument("inputs", nargs=-1, required=True, metavar="RUN_DIR_OR_GLOB...")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path),
              default=Path("reports/sweep"), show_default=True,
              help="Output folder: one report subfolder per checkpoint, trend.* files.")
@click.option("--order", type=click.Choice(["step", "name", "mtime"]), default="step",
              show_default=True, help="step: by the step in each name (checkpoint-N, step_N, "
              "global_stepN); name; mtime (modification time).")
@click.option("--step-regex", metavar="REGEX",
              help="Parse the step with REGEX (its first group) instead of the default pattern.")
@_audit_options
@click.option("--fail-on", metavar="EXPR", help="Conditions as for the audit (default "
              "'rand_num_spikes>0,alpha<2', reported only): the first step each holds, per "
              "matrix; exit 1 if one holds in any checkpoint.")
def sweep_command(inputs, out, order, step_regex, fail_on, **kw):
    """Audit a series of checkpoints (run folders, checkpoint folders or files, globs) and
    write each one's report plus trend.csv/json/md/html; rerunning resumes and reuses."""
    from .progress import ProgressBar
    from .report import parse_formats
    from .report.trend import first_lines
    from .sweep import sweep

    _setup_logging(kw["debug"])
    formats = parse_formats(kw["formats"])

    def done(entry, i, n):
        if not kw["quiet"]:
            traps = "n/a" if entry.total_traps is None else entry.total_traps
            click.echo(f"[{i}/{n}] step {entry.item.step:,} {terminal(entry.item.name, 100)}: "
                       f"{'reused' if entry.reused else 'audited'}, mean alpha "
                       f"{entry.mean_alpha:.3f}, traps {traps}", err=True)

    with contextlib.ExitStack() as stack:
        bar = None if kw["quiet"] or not sys.stderr.isatty() else stack.enter_context(
            ProgressBar())
        result = sweep(inputs, out, order=order, step_regex=step_regex, fail_on=fail_on,
                       formats=formats, allow_pickle=kw["allow_pickle"], progress=bar,
                       on_checkpoint=done, **_options(kw))
    for line in first_lines(result) if (fail_on or not kw["quiet"]) else []:
        click.echo(f"llm-audit: {'fail-on' if fail_on else 'first'}: "
                   f"{terminal(line, ONE_LINE_MAX)}", err=True)
    if not kw["quiet"]:
        click.echo(f"reports: {', '.join(str(p) for p in result.paths)}", err=True)
    return EXIT_FAIL_ON if result.failed else EXIT_OK


SUBCOMMANDS = {"demo": demo_command, "diff": diff_command, "repair": repair_command,
               "sweep": sweep_command}


def main(argv: list[str] | None = None) -> int:
    # before torch loads OpenMP: busy-waiting OpenMP threads make LAPACK 10-80x slower whenever
    # the cores are shared (measured: a 1024² eigvalsh took 5-32 s instead of 0.3 s)
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    if argv is None:  # this process is the CLI's own (not a caller's that embeds it)
        from .batching import fixed_mmap_threshold

        fixed_mmap_threshold()
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
        click.echo(f"llm-audit: error: {terminal(e.format_message(), ONE_LINE_MAX)}", err=True)
        code = EXIT_ERROR
    except (click.exceptions.Abort, KeyboardInterrupt):
        hint = "run it again" if command is sweep_command else "continue with --resume"
        click.echo(f"llm-audit: interrupted ({hint})", err=True)
        code = 130
    except (AuditError, OSError) as e:
        if debug:
            raise
        click.echo(f"llm-audit: error: {_one_line(e)}", err=True)
        code = EXIT_ERROR
    if argv is None:
        sys.exit(code or 0)
    return code or 0


def _one_line(e: Exception) -> str:
    """The error as one terminal-safe line of at most ONE_LINE_MAX characters."""
    if isinstance(e, OSError) and e.filename is not None:
        text = f"{e.filename}: {e.strerror or e}"
    else:
        text = " ".join(str(e).split())
    return terminal(text, ONE_LINE_MAX)


if __name__ == "__main__":
    main()
