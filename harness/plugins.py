"""Loading the implementation a user names: ``TARGET`` on the command line, or a string passed to
:func:`harness.certify`.

A TARGET is one of

* ``package.module:attribute`` — imported like ``python -m`` would (the current directory is searched);
* ``path/to/file.py:attribute`` — the file is executed as a module, with its own directory on
  ``sys.path`` so that it can import its neighbours, as ``python path/to/file.py`` would allow;
* ``name`` — an entry point in the group ``lstm_harness.implementations`` (how third-party packages
  register theirs; the built-ins are registered there too, and found through
  :data:`harness.registry.BUILTIN_IMPLEMENTATIONS` in a source checkout that is not installed).

The attribute (dotted names are followed) may be an implementation object, a class (created with no
arguments) or a zero-argument factory. Whatever goes wrong is a :class:`LoadError` whose message says
what was expected, what was found and what to do about it; the command line turns it into exit code 2.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import inspect
import os
import shlex
import sys
import traceback
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from harness.contract import ImplementationInfo, validate

__all__ = [
    "ENTRY_POINT_GROUP",
    "LoadError",
    "Target",
    "parse_target",
    "load_target",
    "load_implementation",
    "entry_points",
    "instantiate",
    "AdaptedTarget",
]

ENTRY_POINT_GROUP = "lstm_harness.implementations"

_FORMS = ("package.module:attribute, path/to/file.py:attribute, or the name of an entry point in the "
          f"group {ENTRY_POINT_GROUP}")


class LoadError(Exception):
    """The target could not be loaded. The message says what to fix."""


@dataclass(frozen=True)
class Target:
    """What a TARGET string names, before anything is imported."""

    text: str
    kind: str  # "module", "file" or "entry point"
    location: str  # module name, absolute file path, or the entry point's "module:attribute"
    attribute: str

    def to_dict(self) -> dict[str, str]:
        return asdict(self)


def entry_points() -> dict[str, str]:
    """Implementations registered in :data:`ENTRY_POINT_GROUP`, by name: ``{"loop": "impls.loop:LoopLSTM"}``.

    The built-ins of :mod:`harness.registry` are included when the distribution is not installed.
    """
    from harness.registry import BUILTIN_IMPLEMENTATIONS

    found = dict(BUILTIN_IMPLEMENTATIONS)
    for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        found[ep.name] = ep.value
    return found


def _looks_like_file(left: str) -> bool:
    return left.endswith(".py") or "/" in left or os.sep in left


def parse_target(text: str) -> Target:
    """Decide what ``text`` names without importing anything; :class:`LoadError` if it names nothing."""
    if not isinstance(text, str) or not text.strip():
        raise LoadError(f"TARGET: expected {_FORMS}; got {text!r}")
    text = text.strip()
    if ":" in text and not (len(text) > 1 and text[1] == ":" and text.count(":") == 1):
        left, _, attribute = text.rpartition(":")
        if not attribute:
            raise LoadError(
                f"TARGET {text!r}: expected the name of the implementation after the colon, "
                f"e.g. {left}:MyLSTM"
            )
        if _looks_like_file(left):
            return Target(text, "file", str(Path(left).expanduser().resolve()), attribute)
        return Target(text, "module", left, attribute)
    known = entry_points()
    if text in known:
        location = known[text]
        module, _, attribute = location.partition(":")
        return Target(text, "entry point", location, attribute)
    if _looks_like_file(text):
        raise LoadError(
            f"TARGET {text!r}: a file needs the name of the implementation in it: {text}:NAME "
            f"(a class, an object or a zero-argument factory defined in the file)"
        )
    raise LoadError(
        f"TARGET {text!r}: expected {_FORMS}; there is no entry point named {text!r} "
        f"(registered: {', '.join(sorted(known)) or 'none'}). For a module, add the attribute: "
        f"{text}:NAME"
    )


def _exception_text(exc: BaseException) -> str:
    first = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {first[0]}" if first else type(exc).__name__


def _user_traceback(exc: BaseException) -> str:
    """The traceback without importlib's and the harness's own frames."""
    here = os.path.dirname(os.path.abspath(__file__))
    frames = [f for f in traceback.extract_tb(exc.__traceback__)
              if not f.filename.startswith("<frozen") and not os.path.abspath(f.filename).startswith(here)]
    lines = traceback.format_list(frames) + traceback.format_exception_only(type(exc), exc)
    return "".join(lines).rstrip()


def _syntax_error(exc: SyntaxError, what: str) -> LoadError:
    where = f"{exc.filename}, line {exc.lineno}" if exc.filename else what
    line = f"\n    {exc.text.rstrip()}" if exc.text else ""
    return LoadError(f"{what}: the file has a syntax error at {where}: {exc.msg}{line}\n"
                     "Fix the syntax error and run again.")


def _import_module(name: str) -> Any:
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())  # like `python -m`: modules in the current directory are found
    try:
        return importlib.import_module(name)
    except SyntaxError as exc:
        raise _syntax_error(exc, f"importing module {name!r}") from None
    except ModuleNotFoundError as exc:
        missing = exc.name or ""
        if missing and (name == missing or name.startswith(missing + ".")):
            raise LoadError(
                f"cannot import module {name!r}: no module named {missing!r}. Expected an importable "
                f"module: check the spelling, install the package into this Python environment "
                f"({sys.executable}), or run from the directory that contains it "
                f"(the current directory, {os.getcwd()}, is searched). A file can be named directly: "
                f"path/to/file.py:NAME"
            ) from None
        raise LoadError(
            f"importing module {name!r} failed: it imports {missing!r}, which is not installed in this "
            f"environment ({sys.executable}). Install it, or run where it is installed.\n"
            f"{_user_traceback(exc)}"
        ) from None
    except KeyboardInterrupt:
        raise
    except BaseException as exc:  # noqa: BLE001 - at import: a failure to load, never a verdict
        raise LoadError(
            f"importing module {name!r} raised {_exception_text(exc)}; fix the error at import time:\n"
            f"{_user_traceback(exc)}"
        ) from None


def _import_file(path: str) -> Any:
    p = Path(path)
    if not p.exists():
        raise LoadError(f"file {path}: expected an existing Python file; it does not exist "
                        f"(the current directory is {os.getcwd()})")
    if not p.is_file():
        raise LoadError(f"file {path}: expected a Python file, found a directory")
    if p.suffix != ".py":
        raise LoadError(f"file {path}: expected a .py file, got {p.name!r}")
    directory = str(p.parent)
    if directory not in sys.path:
        sys.path.insert(0, directory)
    module_name = f"_lstm_harness_target_{p.stem}"
    spec = importlib.util.spec_from_file_location(module_name, p)
    if spec is None or spec.loader is None:  # pragma: no cover - only for exotic files
        raise LoadError(f"file {path}: Python cannot load it as a module")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    try:
        spec.loader.exec_module(module)
    except SyntaxError as exc:
        sys.modules.pop(module_name, None)
        raise _syntax_error(exc, f"file {path}") from None
    except ModuleNotFoundError as exc:
        sys.modules.pop(module_name, None)
        raise LoadError(
            f"file {path} imports {exc.name!r}, which cannot be found in this environment "
            f"({sys.executable}): install it, or check the spelling.\n{_user_traceback(exc)}"
        ) from None
    except KeyboardInterrupt:
        raise
    except BaseException as exc:  # noqa: BLE001 - SystemExit, or a class of the user's own
        sys.modules.pop(module_name, None)
        raise LoadError(
            f"running file {path} raised {_exception_text(exc)}; fix the error at import time:\n"
            f"{_user_traceback(exc)}"
        ) from None
    return module


def _candidates(module: Any) -> list[str]:
    """Names in ``module`` that could be what the user meant: implementations first. Classes and functions
    count where they are defined here; objects made here count whatever their class (an adapter made
    with ``harness.adapt`` is of the harness's class, but it is this module's implementation)."""

    def made_here(obj: Any) -> bool:
        if inspect.isclass(obj) or inspect.isroutine(obj):
            return getattr(obj, "__module__", None) == module.__name__
        return not inspect.ismodule(obj)

    names = [n for n in vars(module) if not n.startswith("_")]
    own = [n for n in names if made_here(getattr(module, n))]
    with_forward = [n for n in own if hasattr(getattr(module, n), "forward")]
    rest = [n for n in own if n not in with_forward and (inspect.isclass(getattr(module, n))
                                                          or callable(getattr(module, n)))]
    return with_forward + rest


def _attribute(module: Any, attribute: str, where: str) -> Any:
    obj = module
    for i, part in enumerate(attribute.split(".")):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            done = ".".join(attribute.split(".")[:i])
            owner = f"{where}" if not done else f"{where}:{done}"
            names = _candidates(obj) if inspect.ismodule(obj) else [
                n for n in dir(obj) if not n.startswith("_")]
            hint = (f" It defines: {', '.join(names[:12])}." if names
                    else " It defines no implementation, class or function of its own.")
            raise LoadError(
                f"{owner} has no attribute {part!r}: expected the name of an implementation object, "
                f"class or zero-argument factory.{hint}"
            ) from None
    return obj


def _required_parameters(fn: Any) -> list[str] | None:
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return None
    return [p.name for p in sig.parameters.values()
            if p.default is p.empty and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]


def instantiate(obj: Any, what: str) -> Any:
    """An implementation from what the target named: an object as is, a class or factory called."""
    if inspect.ismodule(obj):
        raise LoadError(f"{what} is a module: expected an implementation inside it, e.g. {what}:MyLSTM "
                        f"(it defines: {', '.join(_candidates(obj)[:12]) or 'nothing of its own'})")
    if inspect.isclass(obj):
        required = _required_parameters(obj)
        if required:
            raise LoadError(
                f"{what} is a class whose constructor needs arguments ({', '.join(required)}): expected a "
                f"class that can be created with no arguments, an instance, or a zero-argument factory. "
                f"Give the arguments defaults, or add to the file e.g. `def make(): return "
                f"{obj.__name__}(...)` and pass that instead"
            )
        try:
            return obj()
        except KeyboardInterrupt:
            raise
        except BaseException as exc:  # noqa: BLE001 - SystemExit, or a class of the user's own
            raise LoadError(f"creating {what}() raised {_exception_text(exc)}:\n{_user_traceback(exc)}") from None
    if hasattr(obj, "forward"):
        return obj
    if callable(obj):
        required = _required_parameters(obj)
        if required:
            raise LoadError(
                f"{what} is a function taking ({', '.join(required)}): expected an implementation object "
                f"(with forward and backward), a class, or a zero-argument factory. To certify a forward "
                f"function as it is, wrap it: harness.adapt(forward_fn={getattr(obj, '__name__', 'f')}, "
                f"backward_fn=...) in a module, and name that object"
            )
        try:
            made = obj()
        except KeyboardInterrupt:
            raise
        except BaseException as exc:  # noqa: BLE001 - SystemExit, or a class of the user's own
            raise LoadError(f"calling the factory {what}() raised {_exception_text(exc)}:\n"
                            f"{_user_traceback(exc)}") from None
        if made is None:
            raise LoadError(f"the factory {what}() returned None: expected it to return an implementation")
        return made
    return obj  # validate() says what is missing (forward, variant, ...)


def load_target(text: str, *, as_is: bool = False) -> tuple[Any, Target]:
    """Import what ``text`` names and make the implementation object; :class:`LoadError` on failure.

    A PyTorch-style layer module (``torch.nn.LSTM``, or a module with its parameter names) that does not
    declare a variant, as the contract's implementations do, comes back adapted (``harness.adapt(module)``,
    which reads its structure off its attributes): nn.LSTM's own convention needs no options. ``as_is``:
    the object as made, for a caller that adapts it with options of its own.
    """
    target = parse_target(text)
    if target.kind == "file":
        module = _import_file(target.location)
        where = target.text.rpartition(":")[0]
    else:
        module_name = target.location.partition(":")[0] if target.kind == "entry point" else target.location
        module = _import_module(module_name)
        where = module_name
    obj = instantiate(_attribute(module, target.attribute, where), f"{where}:{target.attribute}")
    if not as_is and not hasattr(obj, "variant"):
        from harness.adapt import adapt, is_torch_layer

        if is_torch_layer(obj):
            try:
                obj = adapt(obj)
            except (ValueError, TypeError) as exc:
                raise LoadError(f"{text} is a PyTorch layer module that cannot be adapted as it is: {exc}") from None
    return obj, target


def load_implementation(text: str, *, variant: str | None = None) -> tuple[Any, ImplementationInfo, Target]:
    """Load and validate: the object, what :func:`~harness.contract.validate` read off it, the target.

    Raises :class:`LoadError` or :class:`~harness.contract.ContractError`.
    """
    obj, target = load_target(text)
    return obj, validate(obj, variant=variant), target


class AdaptedTarget:
    """A TARGET read in another convention: ``harness.adapt(<what TARGET names>, **convention)``.

    What the command line makes of ``TARGET --gate-order ifco ...``. Nothing is imported when it is
    made: :meth:`load` imports and adapts, in whichever process runs the implementation (it pickles
    as the TARGET and the keywords). The keywords are checked now, so that a bad one is a usage error.
    """

    def __init__(self, target: str, convention: Mapping[str, Any]):
        from harness.adapt import adapt_keywords
        from harness.command_protocol import convention_arguments

        parse_target(target)
        self.target = target
        self.convention = adapt_keywords(convention)
        #: How ``lstm-harness replay`` loads it again: the TARGET and the same options.
        self.replay_arguments = " ".join([shlex.quote(target), *convention_arguments(self.convention)])

    def __repr__(self) -> str:
        return f"AdaptedTarget({self.target!r}, {self.convention!r})"

    def load(self) -> Any:
        """The implementation TARGET names, adapted; :class:`LoadError` when it cannot be adapted so."""
        from harness.adapt import adapt

        obj, _ = load_target(self.target, as_is=True)
        try:
            return adapt(obj, **self.convention)
        except (ValueError, TypeError) as exc:
            raise LoadError(f"{self.target} cannot be adapted as the options say: {exc}") from None
