"""The ``lstm-harness`` command line: ``list`` and ``run``.

Exit codes: 0 everything checked agrees; 1 discrepancies (or an implementation errored on valid
input); 2 bad usage, or a target that cannot be loaded or does not meet the contract.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from harness import registry
from harness.cases import PROFILES
from harness.compare import Record
from harness.contract import DEFAULT_DTYPES, ContractError, validate
from harness.runner import RunSettings, run_checks
from harness.subject import InProcessSubject
from harness.summary import details, summary_table, verdict
from reports.json import build_report, write_report

__all__ = ["main", "build_parser"]

EXIT_OK, EXIT_DISCREPANCY, EXIT_USAGE = 0, 1, 2


class UsageError(Exception):
    """Bad usage or an unloadable target: exit code 2 with this message."""


def _progress(label: str, total: int):
    """A one-line progress display on stderr, so that a long run does not look hung."""
    start = time.monotonic()
    interactive = sys.stderr.isatty()
    last = [0.0]

    def update(n: int) -> None:
        now = time.monotonic()
        if interactive and now - last[0] > 0.2:
            last[0] = now
            sys.stderr.write(f"\r  {label}: {n} cases ({now - start:.0f}s)   ")
            sys.stderr.flush()

    def done(n: int) -> None:
        msg = f"  {label}: {n} cases in {time.monotonic() - start:.1f}s"
        sys.stderr.write(("\r" if interactive else "") + msg + " " * 10 + "\n")
        sys.stderr.flush()

    return update, done


def add_run_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--oracle", action="append", metavar="NAME",
                   help="oracle to check against (repeatable; default: every available one)")
    p.add_argument("--dtype", action="append", choices=DEFAULT_DTYPES,
                   help="dtype to check (repeatable; default: every dtype the implementation declares)")
    p.add_argument("--profile", choices=sorted(PROFILES), default=os.environ.get("HYPOTHESIS_PROFILE", "ci")
                   if os.environ.get("HYPOTHESIS_PROFILE") in PROFILES else "ci",
                   help="Hypothesis settings profile (default: ci)")
    p.add_argument("--max-examples", type=_positive_int, metavar="N", help="cases per check")
    p.add_argument("--seed", type=int, metavar="N", help="Hypothesis seed, for a reproducible run")
    p.add_argument("--report-dir", type=Path, default=Path("lstm-report"), metavar="DIR",
                   help="where report.json and failing cases go (default: lstm-report/)")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lstm-harness",
        description="Cross-check LSTM implementations, forward and backward, against oracles.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    p_list = sub.add_parser("list", help="implementations and oracles, with availability")
    p_list.add_argument("--json", action="store_true", help="machine-readable output")
    p_run = sub.add_parser("run", help="cross-check every built-in implementation against every oracle")
    p_run.add_argument("--impl", action="append", metavar="NAME",
                       help="built-in implementation to check (repeatable; default: all available)")
    add_run_options(p_run)
    return parser


def select_oracles(names: Sequence[str] | None) -> list:
    all_oracles = registry.oracles()
    if not names:
        return all_oracles
    by_name = {o.name: o for o in all_oracles}
    unknown = [n for n in names if n not in by_name]
    if unknown:
        raise UsageError(f"--oracle: expected one of {', '.join(by_name)}, got {', '.join(unknown)}")
    return [by_name[n] for n in names]


def cmd_list(args: argparse.Namespace) -> int:
    impls = []
    for entry in registry.implementations():
        row = {"name": entry.name, "target": entry.target, "available": entry.unavailable is None,
               "reason": entry.unavailable or ""}
        if entry.unavailable is None:
            info = validate(entry.create())
            row.update(variant=info.variant, dtypes=list(info.dtypes), backward=info.has_backward)
        impls.append(row)
    oracles = [o.describe() for o in registry.oracles()]
    if args.json:
        print(json.dumps({"implementations": impls, "oracles": oracles}, indent=2))
        return EXIT_OK
    print("Implementations:")
    for r in impls:
        if r["available"]:
            print(f"  {r['name']:<22} available    {r['variant']:<10} {', '.join(r['dtypes']):<18} "
                  f"{'forward+backward' if r['backward'] else 'forward only'}")
        else:
            print(f"  {r['name']:<22} unavailable  {r['reason']}")
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


def run_subject(subject, oracles, args, *, replay_target: str | None = None) -> list[Record]:
    """Every dtype of one subject against ``oracles``; progress on stderr."""
    info = subject.info
    dtypes = [d for d in info.dtypes if not args.dtype or d in args.dtype]
    settings = RunSettings(profile=args.profile, max_examples=args.max_examples, seed=args.seed,
                           case_dir=args.report_dir / "cases", replay_target=replay_target)
    records: list[Record] = []
    for dtype in dtypes:
        update, done = _progress(f"{info.name} {dtype}", 0)
        counted = [0]

        def progress(n: int, update=update) -> None:
            counted[0] = n
            update(n)

        records += run_checks(subject, oracles, dtype=dtype, run=settings, progress=progress)
        done(counted[0])
    return records


def print_results(records: Sequence[Record], *, per_quantity: bool = False) -> str:
    print(summary_table(records, per_quantity=per_quantity))
    limited = sorted({f"{r.oracle}: {r.reason}" for r in records
                      if r.status == "skip" and r.direction == "backward" and "forward" in r.reason})
    for line in limited:
        print(f"note: {line}")
    text = details(records)
    if text:
        print("\nDiscrepancies and errors:\n")
        print(text)
    result = verdict(records)
    print(f"\nVerdict: {result}")
    return result


def cmd_run(args: argparse.Namespace) -> int:
    oracles = select_oracles(args.oracle)
    entries = registry.implementations()
    if args.impl:
        known = {e.name: e for e in entries}
        unknown = [n for n in args.impl if n not in known]
        if unknown:
            raise UsageError(f"--impl: expected one of {', '.join(known)}, got {', '.join(unknown)}")
        entries = [known[n] for n in args.impl]
    records: list[Record] = []
    for entry in entries:
        if entry.unavailable:
            print(f"{entry.name}: unavailable ({entry.unavailable})", file=sys.stderr)
            continue
        impl = entry.create()
        subject = InProcessSubject(impl, validate(impl))
        records += run_subject(subject, oracles, args)
    if not records:
        raise UsageError("nothing to check: no available implementation was selected")
    result = print_results(records)
    report = build_report(
        records,
        command="run",
        target=", ".join(e.target for e in entries if not e.unavailable),
        settings=_settings_dict(args, oracles),
        implementations=[_impl_dict(e) for e in entries if not e.unavailable],
        oracles=[o.describe() for o in oracles],
    )
    path = write_report(report, args.report_dir / "report.json")
    print(f"Report: {path}")
    return EXIT_OK if result == "certified" else EXIT_DISCREPANCY


def _settings_dict(args: argparse.Namespace, oracles) -> dict:
    return {
        "profile": args.profile,
        "max_examples": args.max_examples,
        "seed": args.seed,
        "dtypes": args.dtype or list(DEFAULT_DTYPES),
        "oracles": [o.name for o in oracles],
    }


def _impl_dict(entry) -> dict:
    info = validate(entry.create())
    return {"name": info.name, "variant": info.variant, "dtypes": list(info.dtypes),
            "backward": info.has_backward, "target": entry.target}


COMMANDS = {"list": cmd_list, "run": cmd_run}


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.command:
        parser.print_help()
        return EXIT_USAGE
    try:
        return COMMANDS[args.command](args)
    except UsageError as exc:
        print(f"lstm-harness {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except ContractError as exc:
        print(f"lstm-harness {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
