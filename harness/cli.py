"""The ``lstm-harness`` command line: ``list``, ``run``, ``certify``, ``diagnose``, ``replay``, ``report``.

Exit codes: 0 everything checked agrees; 1 discrepancies (or an implementation errored, broke the
contract at run time or hung on valid input); 2 bad usage, or a target that cannot be loaded or does
not meet the contract (missing ``forward``, unknown variant, wrong signature).
"""

from __future__ import annotations

import argparse
import difflib
import json
import math
import os
import re
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

from harness import registry
from harness._version import __version__
from harness.cases import PROFILES
from harness.contract import DEFAULT_DTYPES, VARIANTS, ContractError, validate
from harness.files import ReportDirError, check_apart, check_writable_file, claim_report_dir
from harness.findings import Finding, findings
from harness.isolation import DEFAULT_TIMEOUT, GIB, default_memory_limit
from harness.quick_exit import run_then_exit
from harness.records import Record, printable, verdict
from harness.session import MAX_EXAMPLES, MAX_TIMEOUT
from harness.summary import terminal_text

__all__ = ["main", "build_parser"]

EXIT_OK, EXIT_DISCREPANCY, EXIT_USAGE = 0, 1, 2


_EXIT_TEXT = """exit codes:
  0  certified: every check agrees with every oracle
  1  discrepancies, or the implementation raised, crashed, hung or broke the contract on valid input
  2  bad usage, or TARGET could not be loaded or does not meet the contract
"""

_TARGET_TEXT = """TARGET is one of:
  package.module:attribute     imported as `python -m` would (the current directory is searched)
  path/to/file.py:attribute    the file is run as a module (its directory is on sys.path)
  NAME                         an entry point in the group lstm_harness.implementations
The attribute may be an implementation object, a class (created with no arguments) or a
zero-argument factory.

Instead of TARGET, --command 'CMD ARGS...' certifies a program in any language that speaks the command
protocol: for each call it is run as `CMD ARGS... REQUEST_DIR RESPONSE_DIR`, reads request.json and the
input arrays (.npy) from REQUEST_DIR and writes y.npy, h_T.npy, c_T.npy (and grad_<name>.npy when
request.json says "gradients": true) into RESPONSE_DIR. The convention options (--gate-order, ...) say
in which layout it takes its parameters; --structure 'layers=2 bidirectional lengths' says it computes a
whole layer (its files are then the layer's: l0.W.npy, l0.reverse.W.npy, ..., and lengths.npy), and
--structures all that it reads each call's structure from request.json.
"""


class UsageError(Exception):
    """Bad usage or an unloadable target: exit code 2 with this message."""


class _Parser(argparse.ArgumentParser):
    """argparse with an error of two lines: what was wrong, and where the options are described.

    argparse's own prints the whole usage block first, which for ``certify`` is some twenty lines of
    options above the one line that says what went wrong. An argument no option takes is reported by
    the command it was given to, and a misspelt command, choice or option gets the nearest valid one.
    """

    def parse_args(self, args: Sequence[str] | None = None, namespace: Any = None) -> Any:  # type: ignore[override]
        argv = list(sys.argv[1:] if args is None else args)
        parsed, extras = self.parse_known_args(argv, namespace)
        if extras:
            name = getattr(parsed, "command", None)
            # the command's own parser, unless the argument came before the command's name
            given_to_command = name in argv and extras[0] in argv and argv.index(extras[0]) > argv.index(name)
            command = getattr(self, "commands", {}).get(name, self) if given_to_command else self
            options = [o for action in command._actions for o in action.option_strings]
            command.error(f"unrecognized arguments: {' '.join(extras)}{_nearest(extras[0], options)}")
        return parsed

    def error(self, message: str) -> NoReturn:
        found = re.search(r"invalid choice: '([^']*)' \(choose from (.*)\)$", message)
        if found:
            message += _nearest(found.group(1), [c.strip("'") for c in found.group(2).split(", ")])
        self.exit(EXIT_USAGE, printable(f"{self.prog}: error: {message}") + "\n"
                  + f"(`{self.prog} --help` describes every option)\n")


def _nearest(given: str, valid: Sequence[str]) -> str:
    """``" (did you mean 'certify'?)"`` when one of ``valid`` is a near spelling of ``given``, else ""."""
    near = difflib.get_close_matches(given.split("=", 1)[0], valid, n=1, cutoff=0.88)
    return f" (did you mean {near[0]!r}?)" if near else ""


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _examples(text: str) -> int:
    value = _positive_int(text)
    if value > MAX_EXAMPLES:
        raise argparse.ArgumentTypeError(f"expected at most {MAX_EXAMPLES:,} cases per check, got {text}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not value > 0 or not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a positive, finite number, got {text}")
    return value


def _seconds(text: str) -> float:
    value = _positive_float(text)
    if value > MAX_TIMEOUT:
        raise argparse.ArgumentTypeError(f"expected at most {MAX_TIMEOUT:g} seconds (a week), got {text}")
    return value


def _gib(text: str) -> float:
    value = _positive_float(text)
    if value > 2**20:  # a pebibyte: beyond any machine, so a typo
        raise argparse.ArgumentTypeError(f"expected at most {2**20} GiB, got {text}")
    return value


def _shard(text: str) -> tuple[int, int]:
    from harness.session import parse_shard

    try:
        return parse_shard(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc).removeprefix("shard: ")) from None


def _jobs(text: str) -> int:
    if text == "auto":
        return max(1, os.cpu_count() or 1)
    return _positive_int(text)


def add_run_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--oracle", action="append", metavar="NAME",
                   help="oracle to check against (repeatable; default: every installed one; one that then "
                        "fails to load is listed as not checked, with the reason)")
    p.add_argument("--dtype", action="append", choices=DEFAULT_DTYPES,
                   help="dtype to check (repeatable; default: every dtype the implementation declares)")
    p.add_argument("--profile", choices=sorted(PROFILES), default=os.environ.get("HYPOTHESIS_PROFILE", "ci")
                   if os.environ.get("HYPOTHESIS_PROFILE") in PROFILES else "ci",
                   help="Hypothesis settings profile (default: ci)")
    p.add_argument("--max-examples", type=_examples, metavar="N",
                   help=f"cases per check (at most {MAX_EXAMPLES:,})")
    p.add_argument("--seed", type=int, metavar="N", help="Hypothesis seed, for a reproducible run")
    p.add_argument("--report-dir", type=Path, default=Path("lstm-report"), metavar="DIR",
                   help="where report.json, index.html and the failing cases (cases/*.npz) go "
                        "(default: lstm-report/)")
    p.add_argument("--junit-xml", type=Path, metavar="PATH", help="also write a JUnit XML report here")
    p.add_argument("--force", action="store_true",
                   help="write the report even into a non-empty directory that holds no previous lstm-harness "
                        "report (its report.json, index.html and cases/ are replaced)")
    _add_verbose_option(p)
    p.add_argument("-n", "--jobs", type=_jobs, default=1, metavar="N",
                   help="parallel worker processes, or 'auto' for one per CPU. The work is cut into units, one "
                        "per implementation, dtype and oracle family (the oracles of one framework), and each of "
                        "N worker processes (fresh interpreters) checks one unit after another, each with its own "
                        "Hypothesis search, keeping to the frameworks it has loaded. "
                        "Default 1: every unit in this process, all oracles sharing each call into the "
                        "implementation")


def _add_verbose_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("-v", "--verbose", action="store_true",
                   help="print every record: one row per quantity and every discrepancy's full message (by "
                        "default: the findings, one per root cause, and a compact table of what was checked)")


def _add_isolation_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--timeout", type=_seconds, metavar="SECONDS",
                   help="limit per call into the implementation (forward, then backward); a call that "
                        f"takes longer is stopped and reported as a hang (default: {DEFAULT_TIMEOUT:g})")
    p.add_argument("--memory-limit", type=_gib, metavar="GIB",
                   help="memory the implementation may reserve beyond what loading it took, in GiB (default: "
                        "half this machine's memory, at least 4); beyond it the implementation gets a "
                        "MemoryError (the worker's address space is capped)")
    p.add_argument("--in-process", action="store_true",
                   help="run the implementation in this process instead of a worker process: faster to "
                        "start, but a crash or hang of the implementation ends the run, and --timeout "
                        "and --memory-limit do not apply")


def _add_command_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("a program in any language (the command protocol)")
    g.add_argument("--command", dest="command_line", metavar="'CMD ARGS...'",
                   help="certify this program instead of a TARGET: run as CMD ARGS... REQUEST_DIR RESPONSE_DIR for "
                        "each call (split like a shell would, never run by one; see below)")
    g.add_argument("--forward-only", action="store_true",
                   help="the program computes the forward pass only: it is never asked for gradients")
    s = g.add_mutually_exclusive_group()
    s.add_argument("--structure", metavar="'WORDS'",
                   help="the one layer structure the program computes, in the words the report uses: layers=L, "
                        "bidirectional, proj=P, cifg, clip=C, lengths (e.g. 'layers=2 bidirectional lengths'); with "
                        "more than one layer or both directions its files are the whole layer's (l0.W.npy, "
                        "l0.reverse.W.npy, ...), with lengths it is given lengths.npy")
    s.add_argument("--structures", metavar="FEATURES",
                   help="the program reads each call's structure from request.json and computes every structure of "
                        "these features (comma-separated, or 'all'): layers, bidirectional, lengths, proj, cifg, "
                        "clip; the harness draws structures of them, as for a configurable Python implementation")
    c = p.add_argument_group("its convention (TARGET or --command), as harness.adapt takes it")
    c.add_argument("--gate-order", metavar="ORDER", help="order of its stacked gate blocks, e.g. ifco, icfo, iofc")
    c.add_argument("--transposed", action="store_true", help="its weights are (D, 4H) and (H, 4H) (per gate: "
                                                             "each matrix transposed)")
    c.add_argument("--bias", choices=("single", "separate", "folded"),
                   help="single b; separate b_ih and b_hh; folded into one matrix over [1, x, h]")
    c.add_argument("--forget-bias", type=float, metavar="F", help="a constant it adds to the forget gate itself")
    c.add_argument("--batch-major", action="store_true", help="x is (B, T, D) and y (B, T, H) (--layout BTD)")
    c.add_argument("--layout", metavar="AXES", help="the axes of its sequences, an arrangement of TBD: TBD "
                                                     "(time-major), BTD (batch-major), DBT (feature-first; "
                                                     "its states are then (H, B))")
    c.add_argument("--per-gate", choices=("separate", "hx", "xh"),
                   help="one matrix and bias per gate (W_i, ..., R_i, ..., b_i, ...): separate input and state "
                        "matrices, or one matrix over [h; x] (hx) or [x; h] (xh)")
    c.add_argument("--column-bias", action="store_true", help="its biases are columns, (4H, 1) or (H, 1)")
    c.add_argument("--state-order", metavar="ORDER",
                   help="for a layered TARGET (num_layers > 1 or bidirectional), the order of its states' "
                        "(num_layers * dirs) axis: layer-major (layer * dirs + direction, the contract's and "
                        "PyTorch's) or direction-major (direction * num_layers + layer)")
    c.add_argument("--y-directions", metavar="ORDER",
                   help="for a bidirectional TARGET, which direction's features come first in its y (and in each "
                        "later layer's input): forward-first (the contract's) or reverse-first")
    c.add_argument("--no-initial-hidden", dest="initial_hidden", action="store_false",
                   help="it takes no h0 (its hidden state starts at zero)")
    c.add_argument("--no-initial-cell", dest="initial_cell", action="store_false",
                   help="it takes no c0 (its cell state starts at zero)")
    c.add_argument("--step", action="store_true",
                   help="TARGET is a one-timestep cell (forward(x_t, prev_h, prev_c, params), backward(dnext_h, "
                        "dnext_c, cache)): the harness runs the loop and the backward through time")
    c.add_argument("--lengths", choices=("packed",),
                   help="for a PyTorch-style layer TARGET (torch.nn.LSTM, or a module with its parameter names): it "
                        "takes lengths as a packed sequence (pack_padded_sequence, enforce_sorted=False)")
    c.add_argument("--names", metavar="OURS=THEIRS,...",
                   help="its own names for the parameters, e.g. W=kernel,R=recurrent_kernel (for a command, its "
                        "files are THEIRS.npy and grad_THEIRS.npy)")


def _convention(args: argparse.Namespace) -> dict[str, Any]:
    """The convention options given, as keywords of harness.adapt (checked: a bad one is a UsageError)."""
    from harness.adapt import adapt_keywords
    from harness.command_protocol import TARGET_OPTIONS

    given: dict[str, Any] = {}
    for key in TARGET_OPTIONS:
        value = getattr(args, key, None)
        if key in ("initial_hidden", "initial_cell"):
            if value is False:
                given[key] = False
        elif value not in (None, False):
            given[key] = value
    if "names" in given:
        pairs = [item.partition("=") for item in given["names"].split(",") if item.strip()]
        if not pairs or any(not sep or not ours or not theirs for ours, sep, theirs in pairs):
            raise UsageError(f"--names: expected OURS=THEIRS pairs separated by commas, e.g. W=kernel,R=recurrent, "
                             f"got {given['names']!r}")
        given["names"] = {ours.strip(): theirs.strip() for ours, _, theirs in pairs}
    try:
        return adapt_keywords(given)
    except ValueError as exc:
        key, _, rest = str(exc).partition(":")
        raise UsageError(f"--{key.replace('_', '-')}:{rest}") from None


def _command_impl(args: argparse.Namespace) -> object | None:
    """The implementation --command names, or a TARGET read in the convention the options give (both
    adapted to their convention); None for a TARGET as it is."""
    given = _convention(args)
    if args.command_line is None:
        if args.forward_only:
            raise UsageError("--forward-only: applies to --command; a Python implementation without a backward "
                             "method is checked forward only")
        if args.target is None:
            raise UsageError("expected TARGET or --command 'CMD ARGS...'")
        for option in ("structure", "structures"):
            if getattr(args, option, None) is not None:
                raise UsageError(f"--{option}: applies to --command; a Python TARGET declares its structure by its "
                                 f"attributes (num_layers, bidirectional, proj_size, accepts_lengths, ...; "
                                 f"with_structure and structures for any structure)")
        if not given:
            return None
        from harness.plugins import AdaptedTarget, LoadError

        try:
            return AdaptedTarget(args.target, given)
        except (LoadError, ValueError) as exc:
            raise UsageError(str(exc)) from None
    if args.target is not None:
        raise UsageError(f"expected TARGET or --command, not both (got {args.target!r} and --command)")
    if given.get("step"):
        raise UsageError("--step: applies to a Python TARGET that computes one timestep; a command computes "
                         "whole sequences")
    if given.get("lengths"):
        raise UsageError("--lengths: applies to a PyTorch-style layer TARGET (torch.nn.LSTM); a program that takes "
                         "lengths says so with --structure '... lengths' (or --structures lengths,...) and is given "
                         "lengths.npy")
    from harness.command_protocol import command

    try:
        return command(args.command_line, variant=args.variant or "vanilla", backward=not args.forward_only,
                       structure=getattr(args, "structure", None), structures=getattr(args, "structures", None),
                       **given)
    except ValueError as exc:
        raise _usage(exc) from None


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="lstm-harness",
        description="Cross-check LSTM implementations, forward and backward, against oracles.",
        epilog=_EXIT_TEXT, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"lstm-harness {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND",
                                help="what to do (`lstm-harness COMMAND --help` describes each)")
    p_list = sub.add_parser(
        "list", help="implementations and oracles, with availability",
        description="List every implementation this environment can load, the built-ins and those other\n"
                    "packages register as entry points in the group lstm_harness.implementations, with its\n"
                    "variant, dtypes and whether it can run here; and every oracle, with what it covers.\n"
                    "An entry point that cannot be loaded is listed as unavailable, with the reason.")
    p_list.add_argument("--json", action="store_true", help="machine-readable output")

    p_run = sub.add_parser(
        "run", help="cross-check several implementations (default: every built-in) against the oracles",
        description="Check each implementation given with --impl (default: every available built-in) the\n"
                    "way certify does, but in this process, and print one combined summary and report.",
        epilog=_TARGET_TEXT + "\n" + _EXIT_TEXT, formatter_class=argparse.RawDescriptionHelpFormatter)
    p_run.add_argument("--impl", action="append", metavar="TARGET",
                       help="implementation to check: a built-in name or any TARGET (see below); repeatable "
                            "(default: every available built-in)")
    p_run.add_argument("--variant", choices=sorted(VARIANTS), help="the variant the --command program computes")
    add_run_options(p_run)
    _add_command_options(p_run)

    p_cert = sub.add_parser(
        "certify", help="certify one implementation (yours): every check, a verdict, a report",
        description="Certify TARGET: forward and backward, every dtype it declares, against every oracle "
                    "that covers its variant, on Hypothesis cases; each failure is shrunk to a minimal "
                    "case that is saved and can be replayed.",
        epilog=_TARGET_TEXT + "\n" + _EXIT_TEXT, formatter_class=argparse.RawDescriptionHelpFormatter)
    p_cert.add_argument("target", metavar="TARGET", nargs="?", help="the implementation (see below)")
    p_cert.add_argument("--variant", choices=sorted(VARIANTS), help="override the variant it declares")
    p_cert.add_argument("--shard", type=_shard, metavar="K/N",
                        help="check only the K-th of N slices of the certification (one unit per dtype and "
                             "oracle, dealt round-robin), e.g. one job of a CI matrix; merge the N reports with "
                             "`lstm-harness report A.json B.json ... -o DIR`")
    add_run_options(p_cert)
    _add_isolation_options(p_cert)
    _add_command_options(p_cert)

    p_diag = sub.add_parser(
        "diagnose", help="find the convention (gate order, layout, variant) under which TARGET matches",
        description="Try TARGET under the 24 gate orders, transposed weights, batch-major input, a forget "
                    "bias of +1 and the other variants, and say under which convention it computes the "
                    "standard LSTM, or where the closest one first departs.",
        epilog=_TARGET_TEXT + "\nexit codes:\n  0  it matches the standard LSTM as declared\n"
               "  1  it matches only under another convention, or under none\n"
               "  2  bad usage, or TARGET could not be loaded\n",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p_diag.add_argument("target", metavar="TARGET", nargs="?", help="the implementation to diagnose (see below; "
                                                                    "or --command)")
    p_diag.add_argument("--variant", choices=sorted(VARIANTS), help="the variant it is meant to be")
    p_diag.add_argument("--dtype", choices=DEFAULT_DTYPES, help="dtype of the trial cases (default: the "
                                                                 "most precise it declares)")
    p_diag.add_argument("--json", action="store_true", help="machine-readable output")
    _add_isolation_options(p_diag)
    _add_command_options(p_diag)

    p_replay = sub.add_parser(
        "replay", help="run one saved case (.npz) through TARGET and the oracles again",
        description="Reproduce exactly the comparison a report recorded: the case file and the TARGET "
                    "come from the record's replay command.",
        epilog=_TARGET_TEXT + "\nexit codes:\n  0  the case passes\n  1  the discrepancy (or error) "
               "reproduces, or nothing could be compared\n  2  bad usage, or the case or TARGET could not be "
               "loaded\n",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p_replay.add_argument("case", metavar="CASE.npz", type=Path,
                          help="a saved case: the .npz file a report's replay command names")
    p_replay.add_argument("target", metavar="TARGET", nargs="?",
                          help="the implementation to run it through (see below; or --command)")
    p_replay.add_argument("--oracle", action="append", metavar="NAME",
                          help="oracle to compare with (repeatable; default: every installed one)")
    p_replay.add_argument("--variant", choices=sorted(VARIANTS), help="override the variant (default: the "
                                                                      "case's)")
    _add_isolation_options(p_replay)
    _add_verbose_option(p_replay)
    _add_command_options(p_replay)

    p_report = sub.add_parser(
        "report", help="render the HTML report from a report.json again, or merge the parts of a certification",
        description="Render index.html (and, if asked, JUnit XML) again from a report.json that certify\n"
                    "or run wrote, without running any check.\n\n"
                    "With several report.json files (the shards of `certify --shard K/N`, from other machines\n"
                    "or CI jobs) and -o DIR: merge them into one report in DIR (report.json, index.html,\n"
                    "junit.xml), the findings and the verdict computed over every unit. Parts of different\n"
                    "harness versions, targets or settings, or holding the same unit twice, are refused;\n"
                    "units that no part holds are named, and the merged report is then not certified.",
        epilog="exit codes:\n  0  rendered; merged: certified\n  1  merged: discrepancies, errors or units "
               "missing\n  2  bad usage, or reports that cannot be read or merged\n",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p_report.add_argument("json_paths", metavar="report.json", type=Path, nargs="+",
                          help="the report.json to render, or the parts to merge")
    p_report.add_argument("-o", "--output", type=Path, metavar="OUT.html|DIR",
                          help="where to write: an .html file (one report rendered again; default: index.html "
                               "beside report.json), or a directory for the merged report")
    p_report.add_argument("--junit-xml", type=Path, metavar="PATH",
                          help="also write JUnit XML here (merged: default DIR/junit.xml)")
    p_report.add_argument("--force", action="store_true",
                          help="merge into a non-empty directory that holds no previous lstm-harness report")
    parser.commands = sub.choices  # type: ignore[attr-defined]  # for _Parser.parse_args's errors
    return parser


def _implementation_rows() -> list[dict[str, Any]]:
    """Every implementation this environment can name: the built-ins, then the entry points other
    packages register, each loaded (a load failure makes it unavailable, with the reason)."""
    from harness.plugins import LoadError, entry_points, load_implementation

    rows: list[dict[str, Any]] = []
    builtins = registry.implementations()
    for entry in builtins:
        row: dict[str, Any] = {"name": entry.name, "target": entry.target, "source": "built-in",
                               "available": entry.unavailable is None, "reason": entry.unavailable or ""}
        if entry.unavailable is None:
            info = validate(entry.create())
            row.update(variant=info.variant, dtypes=list(info.dtypes), backward=info.has_backward)
        rows.append(row)
    builtin_targets = {e.target for e in builtins}
    for name, target in sorted(entry_points().items()):
        if target in builtin_targets:
            continue  # a built-in, registered by this distribution itself
        row = {"name": name, "target": target, "source": "entry point", "available": True, "reason": ""}
        try:
            _, info, _ = load_implementation(name)
        except (LoadError, ContractError) as exc:
            row.update(available=False, reason=f"cannot be loaded: {exc}")
        except Exception as exc:  # noqa: BLE001 - whatever another package raises, the listing goes on
            row.update(available=False, reason=f"cannot be loaded: {type(exc).__name__}: {exc}")
        else:
            row.update(variant=info.variant, dtypes=list(info.dtypes), backward=info.has_backward)
        rows.append(row)
    return rows


def cmd_list(args: argparse.Namespace) -> int:
    impls = _implementation_rows()
    plugins = [{"name": r["name"], "target": r["target"]} for r in impls if r["source"] == "entry point"]
    oracles = [o.describe() for o in registry.oracles()]
    if args.json:
        print(json.dumps({"implementations": impls, "plugins": plugins, "oracles": oracles}, indent=2))
        return EXIT_OK
    print("Implementations:")
    for r in impls:
        origin = f"  (entry point {r['target']})" if r["source"] == "entry point" else ""
        if r["available"]:
            print(f"  {printable(r['name']):<22} available    {r['variant']:<10} {', '.join(r['dtypes']):<18} "
                  f"{'forward+backward' if r['backward'] else 'forward only':<16}{origin}")
        else:
            print(printable(f"  {r['name']:<22} unavailable  {r['reason']}{origin}"))
    if plugins:
        print("\nCertify an implementation with `lstm-harness certify NAME`; check several with "
              "`lstm-harness run --impl NAME --impl ...`.")
    print("\nOracles:")
    for o in oracles:
        if o["available"]:
            versions = ", ".join(f"{k} {v}" for k, v in o["versions"].items()) or "numpy only"
            what = "forward+gradients" if o["gradients"] else "forward only"
            print(f"  {o['name']:<22} available    variants: {', '.join(o['variants'])}; "
                  f"dtypes: {', '.join(o['dtypes'])}; {what}; {versions}")
            if o["limitation"]:
                print(f"  {'':<22}              note: {o['limitation']}")
        else:
            print(f"  {o['name']:<22} unavailable  {o['reason']}")
    return EXIT_OK


def print_results(records: Sequence[Record], found: Sequence[Finding], *, notes: Sequence[str] = (),
                  verbose: bool = False, diagnosis: str = "") -> str:
    """Print the findings, what was checked and the verdict (``verbose``: every record too); the verdict."""
    print(printable(terminal_text(records, found, notes=notes, verbose=verbose, diagnosis=diagnosis)))
    return verdict(records)


def _write_outputs(report: dict, args: argparse.Namespace) -> None:
    from harness.api import write_reports

    problems: list[str] = []
    paths = write_reports(report, args.report_dir, junit=getattr(args, "junit_xml", None), note=problems.append)
    _print_files(paths, problems)


def _run_selection(args: argparse.Namespace) -> dict[str, bool]:
    """The TARGETs ``run`` checks, each with whether it runs in a worker process: every available built-in,
    or those ``--impl`` names (a built-in's name, in process, or any TARGET of the user's, in a worker,
    where it is loaded now too, so that one that cannot be loaded is a usage error before any check)."""
    from harness.isolation import IsolatedSubject, WorkerLoadError

    builtins = {e.name: e for e in registry.implementations()}
    selected: dict[str, bool] = {}
    for text in args.impl or list(builtins):
        entry = builtins.get(text)
        if entry is not None:
            if entry.unavailable:
                print(f"{entry.name}: unavailable ({entry.unavailable})", file=sys.stderr)
                continue
            name, target, info = entry.name, entry.target, validate(entry.create())
        else:
            try:
                with IsolatedSubject(text, timeout=DEFAULT_TIMEOUT) as subject:
                    info = subject.info
            except WorkerLoadError as exc:
                raise UsageError(f"--impl: {exc}") from None
            name, target = text, text
        if args.dtype and not set(args.dtype) & set(info.dtypes):
            print(f"{name}: skipped (declares {', '.join(info.dtypes)} only)", file=sys.stderr)
            continue
        selected[target] = entry is None
    return selected


def _run_command(args: argparse.Namespace) -> object | None:
    """The --command program ``run`` checks besides the --impl TARGETs (the convention options are its)."""
    if args.command_line is None:
        given = list(_convention(args))  # in the order the options are read
        given += [k for k in ("structure", "structures") if getattr(args, k, None) is not None]
        if given or args.forward_only or args.variant:
            first = given[0] if given else "forward_only" if args.forward_only else "variant"
            raise UsageError(f"--{first.replace('_', '-')}: in run, applies to the --command program; to read a "
                             f"Python TARGET in a convention, certify it: lstm-harness certify TARGET "
                             f"--{first.replace('_', '-')} ...")
        return None
    args.target = None
    return _command_impl(args)


def cmd_run(args: argparse.Namespace) -> int:
    from harness.api import Interrupted, InvalidArgument, certify_many
    from harness.plugins import LoadError

    program = _run_command(args)
    selection = _run_selection(args) if args.impl or program is None else {}
    targets: list[Any] = list(selection)
    isolated = list(selection.values())  # the built-ins in process (the main job's speed), the user's in a worker
    labels = list(targets)
    if program is not None:
        targets.append(program)
        isolated.append(False)  # the harness's own code, running the program as a subprocess
        labels.append(getattr(program, "replay_arguments", args.command_line))
    if not targets:
        raise UsageError("nothing to check: no available implementation was selected")
    try:
        if args.junit_xml is not None:
            check_apart(args.junit_xml.absolute(), Path(args.report_dir).absolute())
            check_writable_file(args.junit_xml, "--junit-xml")
        claim = claim_report_dir(args.report_dir, force=args.force)  # the combined report is written here
    except ReportDirError as exc:
        raise UsageError(str(exc).replace("report directory:", "--report-dir:", 1).replace("junit_xml:", "--junit-xml:",
                                                                                            1)) from None
    interrupted = ""
    try:
        results = certify_many(targets, oracles=args.oracle, dtypes=args.dtype,
                               max_examples=args.max_examples, profile=args.profile, seed=args.seed,
                               jobs=args.jobs, isolate=isolated, timeout=DEFAULT_TIMEOUT if any(isolated) else None,
                               memory_limit=default_memory_limit() if any(isolated) else None,
                               report_dir=args.report_dir, write_report=False, progress=True, command="run")
    except (InvalidArgument, LoadError, ContractError) as exc:
        claim.abandon()  # refused before any check: the directory is left as it was found
        if isinstance(exc, InvalidArgument):
            raise _usage(exc) from None
        raise
    except Interrupted as exc:
        results, interrupted = exc.results, exc.signal
    try:
        return _run_report(results, labels, args, interrupted)
    finally:
        claim.release()


def _run_report(results: Sequence[Any], targets: Sequence[str], args: argparse.Namespace, interrupted: str) -> int:
    """The combined report of ``run``: printed, written; the exit code."""
    # The oracles each implementation was checked against (session.select_oracles chose them).
    names = list(dict.fromkeys(n for result in results for n in result.settings["oracles"]))
    by_name = {o.name: o for o in registry.oracles()}
    oracles = [by_name[n] for n in names if n in by_name]
    records: list[Record] = [r for result in results for r in result.records]
    notes = sorted({n for result in results for n in result.notes})
    checked = [{**result.implementation, "target": target} for result, target in zip(results, targets)]
    found = findings(records, [o.name for o in oracles])
    result_text = print_results(records, found, notes=notes, verbose=args.verbose)
    if interrupted:
        print(f"INTERRUPTED by {interrupted}: only what had finished is reported")
    from reports.json import build_report

    report = build_report(
        records,
        command="run",
        target=", ".join(c["target"] for c in checked),
        settings={"profile": args.profile, "max_examples": args.max_examples, "seed": args.seed,
                  "dtypes": args.dtype or list(DEFAULT_DTYPES), "oracles": [o.name for o in oracles],
                  "timeout": None, "jobs": args.jobs},
        implementations=checked,
        oracles=[o.describe() for o in oracles],
        notes=notes,
        found=found,
        interrupted=bool(interrupted),
    )
    _write_outputs(report, args)
    if interrupted:
        return EXIT_SIGNAL.get(interrupted, 130)
    return EXIT_OK if result_text == "certified" else EXIT_DISCREPANCY


def _memory_limit(args: argparse.Namespace) -> int | None:
    if args.in_process:
        return None
    return int(args.memory_limit * GIB) if args.memory_limit else default_memory_limit()


def _isolation(args: argparse.Namespace) -> tuple[bool, float | None]:
    """(isolate, timeout) from --in-process and --timeout."""
    if args.in_process:
        if args.timeout is not None:
            raise UsageError("--timeout: a per-call timeout needs the implementation in a worker process; "
                             "drop --in-process")
        if args.memory_limit is not None:
            raise UsageError("--memory-limit: needs the implementation in a worker process; drop --in-process")
        return False, None
    return True, args.timeout if args.timeout is not None else DEFAULT_TIMEOUT


_OPTION_NAMES = {"oracles:": "--oracle:", "dtypes:": "--dtype:", "dtype:": "--dtype:", "timeout:": "--timeout:",
                 "variant:": "--variant:", "case:": "CASE.npz:", "report directory:": "--report-dir:",
                 "junit_xml:": "--junit-xml:", "memory_limit:": "--memory-limit:", "command:": "--command:",
                 "structure:": "--structure:", "structures:": "--structures:"}


def _usage(exc: Exception) -> UsageError:
    text = str(exc)
    from harness.command_protocol import CONVENTION_KEYWORDS

    names = {**_OPTION_NAMES, **{f"{k}:": f"--{k.replace('_', '-')}:" for k in CONVENTION_KEYWORDS}}
    for api_name, option in names.items():
        if text.startswith(api_name):
            text = option + text[len(api_name):]
            break
    return UsageError(text)


#: The working directory the command started in: paths are shown relative to it (an implementation run in
#: process may change the working directory; the reports stay where they were asked for).
_START = Path.cwd()


def _shown(path: Any) -> str:
    p = Path(path)
    return os.path.relpath(p, _START) if p.is_absolute() and p.is_relative_to(_START) else str(p)


def _print_files(result_files: dict, problems: Sequence[str]) -> None:
    for line in problems:
        print(line, file=sys.stderr)
    if "json" in result_files:
        print(f"Report: {_shown(result_files['json'])}" + (f" and {_shown(result_files['html'])}"
                                                           if "html" in result_files else ""))
    if "junit" in result_files:
        print(f"JUnit XML: {_shown(result_files['junit'])}")


def cmd_certify(args: argparse.Namespace) -> int:
    from harness.api import InvalidArgument, certify

    isolate, timeout = _isolation(args)
    impl = _command_impl(args)  # a command declares its variant itself
    try:
        result = certify(
            args.target if impl is None else impl, variant=args.variant if args.command_line is None else None,
            dtypes=args.dtype, oracles=args.oracle,
            max_examples=args.max_examples, profile=args.profile, seed=args.seed, timeout=timeout,
            isolate=isolate, report_dir=args.report_dir, junit_xml=args.junit_xml, jobs=args.jobs,
            memory_limit=_memory_limit(args), progress=True, force=args.force, shard=args.shard,
        )
    except InvalidArgument as exc:  # only the arguments: anything else is not a usage error
        raise _usage(exc) from None
    described = result.implementation
    print(printable(f"Certifying {described['name']} ({described['target']}): variant {described['variant']}, "
                    f"dtypes {', '.join(result.settings['dtypes'])}, "
                    f"{'forward and backward' if described['backward'] else 'forward only (no backward)'}, "
                    f"oracles: {', '.join(result.settings['oracles']) or 'none'}"))
    text = print_results(result.records, result.findings, notes=result.notes, verbose=args.verbose,
                         diagnosis=(result.diagnosis or {}).get("headline", ""))
    _print_files(result.report_files, result.report_problems)
    return EXIT_OK if text == "certified" else EXIT_DISCREPANCY


def cmd_diagnose(args: argparse.Namespace) -> int:
    from harness.api import InvalidArgument
    from harness.diagnose import diagnose

    isolate, timeout = _isolation(args)
    impl = _command_impl(args)  # a program, or a TARGET read in the convention the options give
    try:
        result = diagnose(args.target if impl is None else impl,
                          variant=args.variant if args.command_line is None else None, dtype=args.dtype,
                          isolate=isolate, timeout=timeout, memory_limit=_memory_limit(args))
    except InvalidArgument as exc:
        raise _usage(exc) from None
    if args.json:
        print(json.dumps(result.to_dict(), indent=2))
    else:
        print(printable(result.text()))
    return EXIT_OK if result.status == "standard" else EXIT_DISCREPANCY


def cmd_replay(args: argparse.Namespace) -> int:
    from harness.api import InvalidArgument, replay

    isolate, timeout = _isolation(args)
    impl = _command_impl(args)
    try:
        result = replay(args.case, args.target if impl is None else impl, oracles=args.oracle, variant=args.variant,
                        isolate=isolate, timeout=timeout, memory_limit=_memory_limit(args))
    except InvalidArgument as exc:
        raise _usage(exc) from None
    case = result.case
    print(f"Replaying {args.case}: {case.variant}, T={case.T}, B={case.B}, D={case.D}, H={case.H}, "
          f"{case.dtype}" + (f", seed={case.spec.seed}" if case.spec else ""))
    found = findings(result.records)
    print(printable(terminal_text(result.records, found, verbose=args.verbose)))
    if any(not r.ok for r in result.records):
        print("\nReproduced: the case still fails.")
    elif result.verdict != "certified":
        print("\nNothing was compared: every check was skipped (see the reasons above), so this replay shows "
              "nothing either way. Choose an oracle that covers the case with --oracle.")
    else:
        print("\nThe case passes: every comparison is within tolerance.")
    return EXIT_OK if result.verdict == "certified" else EXIT_DISCREPANCY


def _read_reports(paths: Sequence[Path]) -> list[tuple[str, dict[str, Any]]]:
    from reports.json import read_report

    out = []
    for path in paths:
        try:
            out.append((_shown(path), read_report(path)))
        except FileNotFoundError:
            raise UsageError(f"report.json: expected an existing file, got {str(path)!r}") from None
        except (ValueError, OSError) as exc:
            raise UsageError(f"report.json: {exc}") from None
    return out


def cmd_report(args: argparse.Namespace) -> int:
    from harness.api import write_html_report

    merging = len(args.json_paths) > 1 or (args.output is not None and args.output.suffix.lower() != ".html")
    if merging:
        return _merge_reports(args)
    ((_, report),) = _read_reports(args.json_paths)
    out = args.output or args.json_paths[0].parent / "index.html"
    problems: list[str] = []
    path = write_html_report(report, out, note=problems.append)
    if args.junit_xml:
        from reports.junit import write_junit

        print(f"JUnit XML: {write_junit(report, args.junit_xml)}")
    if path is None:
        raise UsageError(problems[0] if problems else "the HTML report could not be written")
    print(f"HTML report: {path}")
    return EXIT_OK


def _merge_reports(args: argparse.Namespace) -> int:
    """``report A.json B.json ... -o DIR``: one report from the parts of a certification."""
    from harness.api import write_reports
    from harness.merge import MergeError, merge_reports
    from harness.records import Record

    if args.output is None:
        raise UsageError("-o: expected the directory to write the merged report into (report A.json B.json ... "
                         "-o DIR)")
    parts = _read_reports(args.json_paths)
    try:
        merged = merge_reports(parts)
    except MergeError as exc:
        raise UsageError(str(exc)) from None
    junit = args.junit_xml or args.output / "junit.xml"
    try:
        if args.junit_xml is not None:
            check_apart(args.junit_xml.absolute(), args.output.absolute())
        check_writable_file(junit, "--junit-xml" if args.junit_xml is not None else "-o")  # -o: the default's
        claim = claim_report_dir(args.output, force=args.force)
    except ReportDirError as exc:
        raise UsageError(str(exc).replace("report directory:", "-o:", 1).replace("junit_xml:", "--junit-xml:", 1)) \
            from None
    try:
        records = [Record.from_dict(r) for r in merged["records"]]
        found = [Finding.from_dict(f) for f in merged["findings"]]
        print(printable(f"Merged {len(parts)} report{'s' if len(parts) > 1 else ''} of {merged['target']}"))
        print(printable(terminal_text(records, found, notes=merged["notes"])))
        if merged["verdict"] != verdict(records):
            print(f"Verdict of the merged report: {merged['verdict']} (some units are in no report; see the notes)")
        problems: list[str] = []
        _print_files(write_reports(merged, args.output, junit=junit, note=problems.append), problems)
    finally:
        claim.release()
    return EXIT_OK if merged["verdict"] == "certified" else EXIT_DISCREPANCY


COMMANDS = {"list": cmd_list, "run": cmd_run, "certify": cmd_certify, "diagnose": cmd_diagnose,
            "replay": cmd_replay, "report": cmd_report}


#: Exit codes of a run stopped by a signal: 128 + the signal's number, as a shell reports it.
EXIT_SIGNAL = {"SIGINT": 130, "SIGTERM": 143, "SIGPIPE": 141}


def _raise_interrupted(signum: int, frame: Any) -> None:
    from harness.api import Interrupted

    raise Interrupted(signal.Signals(signum).name)


def main(argv: Sequence[str] | None = None) -> int:
    from harness.api import Interrupted
    from harness.plugins import LoadError

    global _START
    _START = Path.cwd()
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.command:
        parser.print_help()
        return EXIT_USAGE
    # SIGTERM stops a run the way Ctrl-C does: what finished is reported, and the exit code says which signal.
    previous = signal.signal(signal.SIGTERM, _raise_interrupted) if _main_thread() else None
    try:
        code = COMMANDS[args.command](args)
        sys.stdout.flush()  # a buffered standard output meets a reader that went away here, not in a print
        return code
    except (UsageError, LoadError, ContractError) as exc:
        print(printable(f"lstm-harness {args.command}: error: {exc}"), file=sys.stderr)
        return EXIT_USAGE
    except Interrupted as exc:
        if exc.results:
            _print_interrupted(exc, args)
        print(f"lstm-harness {args.command}: interrupted by {exc.signal}", file=sys.stderr)
        return EXIT_SIGNAL.get(exc.signal, 130)
    except KeyboardInterrupt:
        print(f"lstm-harness {args.command}: interrupted by SIGINT", file=sys.stderr)
        return EXIT_SIGNAL["SIGINT"]
    except BrokenPipeError:
        # The reader of standard output went away (`lstm-harness list | head`): nothing more to say. What is
        # still buffered goes nowhere, so that the exit's flush does not fail on the closed pipe again.
        try:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        except (OSError, ValueError):  # stdout is no file (a test's capture)
            pass
        return EXIT_SIGNAL["SIGPIPE"]
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def _print_interrupted(exc: Any, args: argparse.Namespace) -> None:
    """What an interrupted certify had finished: its findings and table, and where its partial report is."""
    for result in exc.results:
        print(printable(terminal_text(result.records, result.findings, notes=result.notes,
                                      verbose=getattr(args, "verbose", False))))
        print(f"INTERRUPTED by {exc.signal}: only what had finished is reported")
        _print_files(result.report_files, result.report_problems)


def entry() -> None:
    """The ``lstm-harness`` command (and ``python -m harness``): :func:`main` on ``sys.argv``, then an exit
    that skips tearing the frameworks down (:mod:`harness.quick_exit`)."""
    run_then_exit(main)


if __name__ == "__main__":
    entry()
