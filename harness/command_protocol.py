"""Certifying an LSTM written in any language: the command protocol.

For each call the harness makes two empty directories and runs ``CMD ARGS... REQUEST_DIR RESPONSE_DIR``
(an argument list, never a shell). REQUEST_DIR holds ``request.json``::

    {"variant": "vanilla", "dtype": "float64", "gradients": false, "ln_eps": 1e-05,
     "structure": {"num_layers": 1, "bidirectional": false, "proj_size": 0,
                   "coupled_input_forget": false, "cell_clip": null, "lengths": false}}

and one ``.npy`` file per array: ``x.npy`` (T, B, D), ``h0.npy``, ``c0.npy`` (B, H), one per parameter
under its name (``W.npy``, ``R.npy``, ``b.npy``, ``p_i.npy``, ...; in the command's own names and
layout when it is adapted, see :func:`command`), and when ``gradients`` is true the upstream gradients
``dy.npy``, ``dh_T.npy``, ``dc_T.npy``. The command writes ``y.npy``, ``h_T.npy``, ``c_T.npy`` into
RESPONSE_DIR and, when asked, ``grad_x.npy``, ``grad_h0.npy``, ``grad_c0.npy`` and ``grad_<param>.npy``
for every parameter it was given, then exits 0. Every file the harness writes is a NumPy ``.npy``
file, C order, little-endian, in the request's dtype (``<f8`` or ``<f4``); what the program writes back
is read as NumPy reads it (either byte order, C or Fortran order; no pickled objects), then checked
for its dtype and shape. Only the last 64 KiB of its stdout and stderr are kept.

``structure`` is the layer structure of the call (:mod:`harness.structure`), whose names and shapes are
the contract's: with more than one layer or both directions (a *layered* structure) the parameters are
prefixed, ``l0.W.npy``, ``l0.reverse.W.npy``, ``l1.R.npy``, ... (and their ``grad_l0.W.npy``, ...), and
the states have a leading (num_layers * dirs) axis; otherwise the names and the (B, H) states stay as
above. A projection adds ``proj.npy`` (``l0.proj.npy``, ...) and makes h0 and R P features wide; with
``lengths`` the request holds ``lengths.npy``, (B,) ``<i8``, which has no gradient. A program computes
either one structure, declared with ``structure=`` (``--structure``), or every structure of the features
it names with ``structures=`` (``--structures``), reading each call's from ``request.json``.

A non-zero exit is an error of that call, reported with the end of the command's stderr; a file the
command should have written and did not, or one that is not a readable ``.npy`` file, is a breach of
the contract. A forward call runs the command without gradients; backward runs it again on the same
inputs with the upstream gradients (so each case costs two runs of the command).

The command runs with the harness's working directory and environment. In a worker process (the
command line's default) it shares the worker's timeout and memory cap: a command that hangs is killed
with the worker, which leads a process group of its own.
"""

from __future__ import annotations

import copy
import json
import os
import shlex
import shutil
import signal
import subprocess
import tempfile
import threading
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from harness.cases import drawable_features
from harness.contract import DEFAULT_DTYPES, DEFAULT_LN_EPS, VARIANTS, ContractError, declared_structure
from harness.structure import FEATURES, Structure

__all__ = ["CommandLSTM", "CommandError", "command", "convention_arguments", "structure_argument", "features_argument",
           "STDERR_LIMIT", "CONVENTION_KEYWORDS", "TARGET_OPTIONS"]

#: The :func:`harness.adapt` keywords that describe how a program (or a Python TARGET on the command line)
#: lays out its arrays; each is a command-line option of the same name (``--gate-order``, ...).
CONVENTION_KEYWORDS = ("gate_order", "transposed", "bias", "forget_bias", "batch_major", "layout", "per_gate",
                       "column_bias", "initial_hidden", "initial_cell", "names", "state_order", "y_directions")

#: The :func:`harness.adapt` keywords that are command-line options for a Python TARGET too: the convention
#: keywords, ``step`` (``--step``) and ``lengths`` (``--lengths packed``), in the order the options are read.
TARGET_OPTIONS = ("gate_order", "transposed", "bias", "forget_bias", "batch_major", "layout", "per_gate",
                  "column_bias", "state_order", "y_directions", "initial_hidden", "initial_cell", "step", "names",
                  "lengths")

#: Characters of a failing command's stderr kept in its error (the start and the end, if longer).
STDERR_LIMIT = 4000

_UPSTREAM = ("dy", "dh_T", "dc_T")
_OUTPUTS = ("y", "h_T", "c_T")
#: The structure's fields as the contract's attributes (``lengths`` is ``accepts_lengths`` there).
_ATTRIBUTES = {"num_layers": "num_layers", "bidirectional": "bidirectional", "proj_size": "proj_size",
               "coupled_input_forget": "coupled_input_forget", "cell_clip": "cell_clip", "lengths": "accepts_lengths"}


class CommandError(RuntimeError):
    """The command exited with a non-zero status, or could not be started."""


def _argv(cmd: str | Sequence[str]) -> list[str]:
    if isinstance(cmd, str):
        argv = shlex.split(cmd)
    elif isinstance(cmd, Sequence) and all(isinstance(a, str) for a in cmd):
        argv = list(cmd)
    else:
        raise ValueError(f"command: expected a command line (a string) or a list of strings, got "
                         f"{type(cmd).__name__}")
    if not argv:
        raise ValueError("command: expected a command line such as './my_lstm --double', got an empty one")
    program = argv[0]
    if os.sep in program or (os.altsep and os.altsep in program):
        if not (os.path.isfile(program) and os.access(program, os.X_OK)):
            raise ValueError(f"command: {program!r} is not an executable file (the current directory is "
                             f"{os.getcwd()}); build it, or give its path")
    elif shutil.which(program) is None:
        raise ValueError(f"command: {program!r} is not found on PATH; give the path to the program "
                         f"(e.g. ./{program})")
    return argv


def structure_argument(structure: Structure | str | None, variant: str | None = None) -> Structure:
    """``structure=`` as given: a :class:`Structure`, its text (``"layers=2 bidirectional lengths"``, see
    :meth:`Structure.parse`) or None (the default), and defined for ``variant`` when it is given; a
    ValueError names ``structure``."""
    if structure is None:
        return Structure()
    if isinstance(structure, str):
        try:
            structure = Structure.parse(structure, variant)
        except ValueError as exc:
            raise ValueError(f"structure: {exc}") from None
    if not isinstance(structure, Structure):
        raise ValueError(f"structure: expected a harness.structure.Structure or its text such as 'layers=2 "
                         f"bidirectional', got {type(structure).__name__}")
    problems = structure.problems(variant)
    if problems:
        raise ValueError(f"structure: {'; '.join(problems)}")
    return structure


def features_argument(structures: Iterable[str] | str, variant: str | None = None) -> tuple[str, ...]:
    """``structures=`` as given: feature names (:data:`FEATURES`), as an iterable or one text separated by
    commas or spaces, or ``"all"`` (every feature ``variant`` defines); in :data:`FEATURES`' order. A
    ValueError names ``structures``, and a feature the variant does not define (LayerNorm: proj, clip)."""
    words = structures.replace(",", " ").split() if isinstance(structures, str) else list(structures)
    # max_H=2: any cell a projection fits, so that only the variant decides
    defined = FEATURES if variant is None else drawable_features(variant, FEATURES, max_H=2)
    if words == ["all"]:
        return tuple(f for f in FEATURES if f in defined)
    unknown = [w for w in words if w not in FEATURES]
    if unknown or not words:
        raise ValueError(f"structures: expected structure features among {', '.join(FEATURES)} (or 'all'), got "
                         f"{', '.join(map(repr, unknown)) if unknown else 'none'}")
    undefined = [w for w in words if w not in defined]
    if undefined:
        raise ValueError(f"structures: the {variant} variant does not define {', '.join(undefined)}")
    return tuple(f for f in FEATURES if f in words)


def _bounded(text: str, limit: int = STDERR_LIMIT) -> str:
    """The start and the end of ``text`` when it is longer than ``limit`` characters."""
    text = text.rstrip()
    if len(text) <= limit:
        return text
    head, tail = limit // 4, limit - limit // 4
    return f"{text[:head]}\n[... {len(text) - head - tail} characters left out ...]\n{text[-tail:]}"


def _save(path: Path, array: np.ndarray) -> None:
    a = np.ascontiguousarray(array)
    np.save(path, a.astype(a.dtype.newbyteorder("<"), copy=False), allow_pickle=False)


class CommandLSTM:
    """An implementation that runs an external command for each forward and each backward call.

    ``command`` is a command line (split like a POSIX shell would, but never run by one) or an
    argument list; the two directories are appended to it. ``backward=False`` for a command that
    computes the forward pass only (it is never asked for gradients). It speaks the canonical contract: the
    parameters it is handed are written under their names, and it must return a gradient for each.
    Wrap it with :func:`harness.adapt` (or use :func:`command`) for another layout.

    ``structure`` (a :class:`Structure` or its text) is the one layer structure the program computes;
    ``structures`` (feature names, or ``"all"``) instead says it computes every structure made of those
    features and reads each call's from ``request.json``: the harness then draws structures for it, as for
    a configurable Python implementation (:meth:`with_structure`).
    """

    def __init__(self, command: str | Sequence[str], *, variant: str = "vanilla", name: str | None = None,
                 dtypes: Sequence[str] | None = None, ln_eps: float = DEFAULT_LN_EPS, backward: bool = True,
                 states: Sequence[str] = ("h0", "c0"), structure: Structure | str | None = None,
                 structures: Iterable[str] | str | None = None):
        self.argv = _argv(command)
        if variant not in VARIANTS:
            raise ValueError(f"variant: expected one of {sorted(VARIANTS)}, got {variant!r}")
        fixed = structure_argument(structure, variant)
        if structures is not None and not fixed.is_default:
            raise ValueError("structure: a program with structures= reads each call's structure from request.json; "
                             "give structure= (one structure) or structures= (the features it computes), not both")
        #: Whether the harness draws structures for it (``structures=``) or certifies it in one (``structure=``).
        self.configurable = structures is not None
        #: The structure features it computes: all it is given, when it reads its structure from request.json.
        self.structures = (features_argument(structures, variant) if structures is not None
                           else tuple(f for f in FEATURES if f in fixed.features()))
        self._declare(fixed)
        #: The initial states the program takes (``h0.npy``, ``c0.npy``): an adapter with
        #: ``initial_hidden=False`` or ``initial_cell=False`` calls forward without the others.
        self.states = tuple(s for s in ("h0", "c0") if s in states)
        self.variant = variant
        # Paths shortened to their last part: the table's first column stays readable.
        self.name = name or " ".join(os.path.basename(a) if os.sep in a else a for a in self.argv)
        self.dtypes = tuple(dtypes) if dtypes is not None else DEFAULT_DTYPES
        self.ln_eps = float(ln_eps)
        #: How ``lstm-harness replay`` loads this implementation again (the harness shows it with each failure).
        self.replay_arguments = _arguments(self.argv, variant, backward, {}, fixed,
                                           self.structures if self.configurable else None)
        if backward:  # a forward-only command has no backward at all: the harness then checks forward only
            self.backward = self._backward

    def __repr__(self) -> str:
        return f"CommandLSTM({shlex.join(self.argv)!r}, variant={self.variant!r})"

    def _declare(self, structure: Structure) -> None:
        """Declare ``structure`` by the contract's attributes (``num_layers``, ..., ``accepts_lengths``)."""
        for field_name, attribute in _ATTRIBUTES.items():
            setattr(self, attribute, getattr(structure, field_name))

    @property
    def structure(self) -> Structure:
        """The structure of its calls, as the contract reads it off the attributes :meth:`_declare` set."""
        return declared_structure(self)

    def with_structure(self, structure: Structure) -> CommandLSTM:
        """This program, for calls in ``structure`` (the harness configures it per case when it was given
        ``structures=``): a copy whose request.json says ``structure``. One declared with ``structure=``
        computes that structure only."""
        if not self.configurable and structure != self.structure:
            raise ValueError(f"{self.name}: computes {self.structure.describe() or 'the default structure'} only "
                             f"(it was given structure=, not structures=), not {structure.describe() or 'the default'}")
        problems = structure.problems(self.variant)
        missing = [f for f in FEATURES if f in structure.features() and f not in self.structures]
        if missing:
            problems.append(f"does not compute {', '.join(missing)} (it was given structures="
                            f"{','.join(self.structures) or 'none'})")
        if problems:
            raise ValueError(f"{self.name}: " + "; ".join(problems))
        new = copy.copy(self)
        new._declare(structure)
        if "backward" in new.__dict__:
            new.backward = new._backward  # bound to the copy, whose structure the request says
        return new

    def forward(self, x, *states_and_params, lengths=None):
        *states, params = states_and_params
        if len(states) != len(self.states):
            raise TypeError(f"forward: expected x, {', '.join(self.states)} and params, got {len(states) + 2} "
                            f"arguments")
        inputs = {"x": x, **dict(zip(self.states, states)), **params}
        if lengths is not None:
            inputs["lengths"] = np.asarray(lengths, dtype=np.int64)
        out = self._run(inputs, upstream=None, expect=_OUTPUTS, call="forward")
        return out["y"], out["h_T"], out["c_T"], inputs

    def _backward(self, dy, dh_T, dc_T, cache):
        if not isinstance(cache, Mapping) or "x" not in cache:
            raise TypeError(f"cache: expected what this implementation's forward returned, got "
                            f"{type(cache).__name__}")
        differentiable = [k for k in cache if k != "lengths"]  # integers: no gradient
        out = self._run(cache, upstream={"dy": dy, "dh_T": dh_T, "dc_T": dc_T},
                        expect=[f"grad_{k}" for k in differentiable], call="backward")
        return {k: out[f"grad_{k}"] for k in differentiable}

    def _run(self, inputs: Mapping[str, Any], *, upstream: Mapping[str, Any] | None, expect: Sequence[str],
             call: str) -> dict[str, np.ndarray]:
        x = np.asarray(inputs["x"])
        request = {"variant": self.variant, "dtype": x.dtype.name, "gradients": upstream is not None,
                   "ln_eps": self.ln_eps, "structure": self.structure.to_dict()}
        with tempfile.TemporaryDirectory(prefix="lstm-harness-command-") as tmp:
            req, resp = Path(tmp, "request"), Path(tmp, "response")
            req.mkdir()
            resp.mkdir()
            (req / "request.json").write_text(json.dumps(request), encoding="utf-8")
            for key, value in {**inputs, **(upstream or {})}.items():
                if not key or os.sep in key or (os.altsep and os.altsep in key) or key.startswith("."):
                    raise ValueError(f"names: {key!r} cannot be a file name in REQUEST_DIR; map it to a plain "
                                     f"name with names=...")
                _save(req / f"{key}.npy", np.asarray(value))
            argv = [*self.argv, str(req), str(resp)]
            try:
                returncode, stdout, stderr = _run(argv)
            except OSError as exc:
                raise CommandError(f"could not run {shlex.join(self.argv)}: {exc}") from None
            if returncode != 0:
                status = (f"was killed by {_signal_name(-returncode)}" if returncode < 0
                          else f"exited with status {returncode}")
                err = stderr.decode("utf-8", "replace").strip()
                text = f"stderr:\n{_bounded(err)}" if err else "stderr was empty"
                if not err and stdout.strip():
                    text += f"; stdout:\n{_bounded(stdout.decode('utf-8', 'replace'))}"
                raise CommandError(f"the command {shlex.join(self.argv)} ({call}) {status}; {text}")
            return _read(resp, expect, call)


#: The bytes of a program's stdout and stderr kept (the last ones): enough for any error message.
OUTPUT_TAIL = 64 * 1024


def _run(argv: list[str]) -> tuple[int, bytes, bytes]:
    """Run a program to its end: its exit status and the last :data:`OUTPUT_TAIL` bytes of its stdout and
    stderr. The rest is read and dropped as it comes, so that a program that prints gigabytes costs the
    harness no memory (collecting all of it raised MemoryError under the worker's memory cap)."""
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    tails: dict[int, bytes] = {}

    def drain(stream: Any) -> None:
        kept = bytearray()
        while chunk := stream.read(65536):
            kept += chunk
            if len(kept) > 2 * OUTPUT_TAIL:
                del kept[:-OUTPUT_TAIL]
        tails[id(stream)] = bytes(kept[-OUTPUT_TAIL:])

    readers = [threading.Thread(target=drain, args=(s,), daemon=True) for s in (proc.stdout, proc.stderr)]
    for reader in readers:
        reader.start()
    try:
        returncode = proc.wait()
    except BaseException:  # stopped (Ctrl-C, SIGTERM, a timeout): the program goes too, then its pipes close
        proc.kill()
        proc.wait()
        raise
    finally:
        for reader in readers:
            reader.join()
        for stream in (proc.stdout, proc.stderr):
            stream.close()  # type: ignore[union-attr]
    return returncode, tails.get(id(proc.stdout), b""), tails.get(id(proc.stderr), b"")


def _signal_name(number: int) -> str:
    try:
        return f"{signal.Signals(number).name} (signal {number})"
    except ValueError:
        return f"signal {number}"


def _read(folder: Path, names: Sequence[str], call: str) -> dict[str, np.ndarray]:
    out, problems = {}, []
    for name in names:
        path = folder / f"{name}.npy"
        if not path.is_file():
            kind = "a directory" if path.is_dir() else "not a regular file" if path.exists() or path.is_symlink() \
                else ""
            problems.append(f"{name}.npy in RESPONSE_DIR is {kind}, not an array file" if kind
                            else f"the command wrote no {name}.npy into RESPONSE_DIR")
            continue
        try:
            out[name] = np.load(path, allow_pickle=False)
        except Exception as exc:  # noqa: BLE001 - whatever np.load makes of a broken file
            problems.append(f"{name}.npy is not a readable .npy file ({type(exc).__name__}: {exc})")
    if problems:
        written = sorted(p.name for p in folder.iterdir())
        problems.append(f"it wrote: {', '.join(written) or 'nothing'}")
        raise ContractError(problems, subject=f"the command ({call})")
    return out


def command(cmd: str | Sequence[str], *, variant: str = "vanilla", name: str | None = None,
            dtypes: Sequence[str] | None = None, ln_eps: float = DEFAULT_LN_EPS, backward: bool = True,
            structure: Structure | str | None = None, structures: Iterable[str] | str | None = None,
            **convention: Any) -> Any:
    """An implementation object for an LSTM behind the command protocol, usable with :func:`harness.certify`.

    ``convention`` takes the keywords of :func:`harness.adapt` that describe a layout
    (:data:`CONVENTION_KEYWORDS`: ``gate_order``, ``transposed``, ``bias``, ``forget_bias``,
    ``batch_major``, ``layout``, ``per_gate``, ``column_bias``, ``initial_hidden``, ``initial_cell``,
    ``names``): the command then receives its arrays, and returns their gradients, in its own layout
    and names; with ``initial_hidden=False`` (``initial_cell=False``) it is given no ``h0.npy``
    (``c0.npy``) and writes no gradient of it.

    ``structure`` and ``structures`` are :class:`CommandLSTM`'s: the one layer structure the program
    computes (``"layers=2 bidirectional lengths"``), or the features of every structure it computes when it
    reads each call's from ``request.json``. A whole layer keeps the contract's prefixed names; of the
    convention keywords it takes ``layout`` (or ``batch_major``), ``state_order`` and ``y_directions``, and a
    program with ``structures=`` takes none (its layout would have to hold in every structure).
    """
    unknown = [k for k in convention if k not in CONVENTION_KEYWORDS]
    if unknown:
        raise ValueError(f"{unknown[0]}: not a convention keyword for a command; expected among "
                         f"{CONVENTION_KEYWORDS}")
    if structures is not None and convention:
        first = next(iter(convention))
        raise ValueError(f"{first}: a program given structures= (--structures) is certified in the contract's "
                         f"layout (the harness configures it per case); declare one structure with structure= "
                         f"(--structure) to certify it in a layout of its own")
    states = [s for s, key in (("h0", "initial_hidden"), ("c0", "initial_cell")) if convention.get(key, True)]
    impl = CommandLSTM(cmd, variant=variant, name=name, dtypes=dtypes, ln_eps=ln_eps, backward=backward,
                       states=states, structure=structure, structures=structures)
    if not convention:
        return impl
    from harness.adapt import adapt

    adapted = adapt(impl, **convention)
    adapted.replay_arguments = _arguments(impl.argv, variant, backward, convention,  # type: ignore[attr-defined]
                                          impl.structure, None)
    return adapted


def _arguments(argv: Sequence[str], variant: str, backward: bool, convention: Mapping[str, Any],
               structure: Structure, structures: Sequence[str] | None) -> str:
    """The command-line options that make the same implementation: ``--command 'CMD ARGS' --per-gate ...``."""
    parts = ["--command", shlex.quote(shlex.join(argv))]
    if variant != "vanilla":
        parts += ["--variant", variant]
    if not backward:
        parts.append("--forward-only")
    if structures is not None:
        parts += ["--structures", ",".join(structures)]
    elif not structure.is_default:
        parts += ["--structure", shlex.quote(structure.describe(exact=True))]
    return " ".join(parts + convention_arguments(convention))


def convention_arguments(convention: Mapping[str, Any]) -> list[str]:
    """The command-line options (shell-quoted) that select ``convention`` (keywords of :func:`harness.adapt`):
    ``--per-gate hx``, ``--no-initial-hidden``, ``--names W=kernel``, ... (``step=True`` is ``--step``)."""
    parts: list[str] = []
    for key, value in convention.items():
        option = "--" + key.replace("_", "-")
        if key in ("initial_hidden", "initial_cell"):
            if value is False:
                parts.append("--no-" + key.replace("_", "-"))
        elif value is True:
            parts.append(option)
        elif key == "names":
            parts += [option, shlex.quote(",".join(f"{k}={v}" for k, v in value.items()))]
        elif value not in (False, None):
            parts += [option, shlex.quote(str(value))]
    return parts
