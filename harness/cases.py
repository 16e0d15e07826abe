"""Cases: the inputs, parameters and upstream gradients of one check, and the strategies that draw them.

A case is fully determined by a small :class:`CaseSpec` (variant, dtype, shapes, scales and a seed):
Hypothesis draws and shrinks the spec, and :func:`build_case` turns it into arrays with NumPy's
generator. This keeps generation fast for arrays of any size, makes every case reproducible from
a one-line spec, and still lets Hypothesis shrink shapes and scales towards the smallest failure.
A case can also be saved to and loaded from ``.npz`` exactly, arrays included.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import numpy as np
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.errors import InvalidArgument

from harness.clipping import MARGIN, cell_values, choose_clip
from harness.contract import DEFAULT_DTYPES, DEFAULT_LN_EPS, VARIANTS, param_shapes
from harness.files import atomic_path
from harness.structure import FEATURES, Structure

__all__ = [
    "Case",
    "CaseSpec",
    "WEIGHT_SCALES",
    "build_case",
    "case_specs",
    "cases",
    "load_case",
    "case_file_name",
    "digest_in_name",
    "replay_command",
    "slug",
    "MAX_CASE_BYTES",
    "LENGTHS",
    "UNSORTED_LENGTHS",
    "case_features",
    "structure_fields",
    "drawable_features",
    "derived_seed",
    "OVERFLOW_SCALES",
    "register_profiles",
    "PROFILES",
]

#: Standard deviation of the gate pre-activations each weight scale aims at. "saturating" puts most
#: pre-activations beyond magnitude 20, where sigmoid and tanh are flat to double precision.
#: "overflow" is the far end of each dtype's range (its value here is for float64; see
#: :data:`OVERFLOW_SCALES`, and :func:`build_case` for how it is reached): pre-activations and
#: initial cell states beyond the magnitude at which
#: ``exp`` overflows in that dtype, where the LSTM itself is still finite and exact (sigmoid is 0 or 1,
#: tanh is -1 or 1) but a formula that divides two exponentials gives inf/inf = NaN.
WEIGHT_SCALES: dict[str, float] = {
    "tiny": 1e-3,
    "small": 0.1,
    "unit": 1.0,
    "large": 4.0,
    "saturating": 25.0,
    "overflow": 1065.0,
}

#: Scale of the "overflow" regime by dtype: 1.5 times the largest argument whose exp is finite (88.7
#: in float32, 709.8 in float64), so that about half the pre-activations and initial cell states lie
#: beyond it and the rest on the way there.
OVERFLOW_SCALES: dict[str, float] = {
    dtype: 1.5 * float(np.log(np.finfo(dtype).max)) for dtype in ("float32", "float64")
}

#: The share of drawn cases in the "overflow" regime (when it is among the weight scales to draw).
OVERFLOW_SHARE = 0.15

#: How the rows of W and R are drawn: independently, or nearly equal within each gate (layernorm only).
ROWS: tuple[str, ...] = ("random", "near_constant")

#: Scales of the variant-specific parameters: peephole weights, LayerNorm gains and shifts.
EXTRA_SCALES: dict[str, float] = {"zero": 0.0, "tiny": 1e-3, "small": 0.1, "unit": 1.0, "large": 5.0}

#: The LayerNorm gains a case may have (CaseSpec.gain), the first the one drawn cases shrink to.
GAINS = ("unit", "random", "near_zero")


@dataclass(frozen=True)
class CaseSpec:
    """Everything needed to rebuild a case bit for bit."""

    variant: str = "vanilla"
    dtype: str = "float64"
    T: int = 3
    B: int = 2
    D: int = 3
    H: int = 4
    seed: int = 0
    weight_scale: str = "unit"
    state: str = "random"  # "zero" or "random" initial h0, c0
    extra_scale: str = "unit"  # peephole weights / LayerNorm gains and shifts
    gain: str = "unit"  # LayerNorm gains: "unit" around 1, "near_zero", "random"
    upstream: str = "all"  # "all": dy, dh_T, dc_T random; "y_only": dh_T = dc_T = 0; "final_only": dy = 0
    rows: str = "random"  # "near_constant": each gate's W and R rows nearly equal (LayerNorm edge case)
    ln_eps: float = DEFAULT_LN_EPS
    # The layer structure (harness.structure); the defaults are the single-layer, full-length LSTM.
    num_layers: int = 1
    bidirectional: bool = False
    proj_size: int = 0
    cifg: bool = False  # coupled input and forget gates
    #: Clip the cell state: True lets build_case choose the value (harness.clipping); a float is the value
    #: (an implementation's declared clip), the inputs then redrawn until every cell keeps the margin.
    cell_clip: bool | float = False
    lengths: str = "none"  # LENGTHS: "none" (no lengths), "equal", "ones" or "random" (unsorted)

    def replace(self, **changes: Any) -> CaseSpec:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @property
    def structure(self) -> Structure:
        """The structure the case is drawn in; with ``cell_clip`` its clip is a placeholder (1.0) until
        :func:`build_case` chooses the value from the case's numbers."""
        clip = self.cell_clip
        value = (1.0 if clip else None) if isinstance(clip, bool) else clip
        return Structure(num_layers=self.num_layers, bidirectional=self.bidirectional, proj_size=self.proj_size,
                         coupled_input_forget=self.cifg, cell_clip=value, lengths=self.lengths != "none")

    def describe(self) -> str:
        structure = self.structure.replace(cell_clip=None, lengths=False).describe()
        return (
            f"{self.variant} {self.dtype} T={self.T} B={self.B} D={self.D} H={self.H} seed={self.seed} "
            f"weights={self.weight_scale} state={self.state} upstream={self.upstream}"
            + (f" rows={self.rows}" if self.rows != "random" else "")
            + (f" {structure}" if structure else "")
            + (" clip" if self.cell_clip else "")
            + (f" lengths={self.lengths}" if self.lengths != "none" else "")
        )


#: How a case's lengths are drawn (CaseSpec.lengths): none at all; every row the same length (drawn in
#: 1..T); every row of length 1; each row its own length in 1..T, unsorted, with T among them (and,
#: where B >= 2 and T >= 2, not all the same).
LENGTHS: tuple[str, ...] = ("none", "equal", "ones", "random")

#: What :func:`case_features` adds for a case whose lengths are not in decreasing order: the order in which
#: a batch arrives unless someone sorted it, and the one that an implementation written for sorted batches
#: (``pack_padded_sequence``'s ``enforce_sorted=True`` habit) gets wrong. A search counts such cases apart
#: (harness.runner: a floor of its own), since only "random" lengths with B >= 2 and T >= 2 have them.
UNSORTED_LENGTHS = "unsorted lengths"


def case_features(case: Case) -> frozenset[str]:
    """The structure features of ``case`` (:meth:`Structure.features`), and :data:`UNSORTED_LENGTHS` when some
    row is longer than the row before it."""
    features = case.structure.features()
    if case.lengths is not None and bool(np.any(np.diff(np.asarray(case.lengths)) > 0)):
        return features | {UNSORTED_LENGTHS}
    return features


def slug(name: str) -> str:
    """``name`` as a safe part of a file name: letters, digits, ``-`` and ``_``, at most 60 characters."""
    return "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in name)[:60] or "impl"


def case_file_name(implementation: str, case: Case, what: str = "") -> str:
    """The file name a case of ``implementation`` is saved under: readable parts (dtype, shapes, weight
    scale), then the case's :meth:`Case.digest`, so that two different cases never share a file; ``what``
    it shows (``worst``, ``crash``, ...) is added when it is not a minimal failing case."""
    scale = f"-{case.spec.weight_scale}" if case.spec else ""
    structure = _structure_tag(case.structure)
    tag = f"{case.dtype}-T{case.T}B{case.B}D{case.D}H{case.H}{structure}{scale}-{case.digest()}"
    return f"{slug(implementation)}-{tag}" + (f"-{what}" if what else "") + ".npz"


def _structure_tag(structure: Structure) -> str:
    """``-L2bi-P3-cifg-clip-len`` for a structured case; "" for the default structure."""
    parts = []
    if structure.num_layers > 1 or structure.bidirectional:
        parts.append(f"L{structure.num_layers}" + ("bi" if structure.bidirectional else ""))
    if structure.proj_size:
        parts.append(f"P{structure.proj_size}")
    parts += [name for name, on in (("cifg", structure.coupled_input_forget), ("clip", structure.cell_clip is not None),
                                    ("len", structure.lengths)) if on]
    return "".join(f"-{p}" for p in parts)


#: The digest at the end of a case file's name (before an optional ``-what``): see :func:`case_file_name`.
_DIGEST_IN_NAME = re.compile(r"-([0-9a-f]{12})(?:-[a-z]+)?\.npz$")


def digest_in_name(path: str | os.PathLike[str]) -> str | None:
    """The content digest a case file's name promises, or None for a name not made by the harness."""
    m = _DIGEST_IN_NAME.search(Path(path).name)
    return m.group(1) if m else None


#: What a replay command names when no TARGET string loads the implementation (an object defined in a
#: script, or with state of its own).
NO_TARGET = "MODULE:ATTRIBUTE"


def replay_command(case_file: str, target: str | None, oracle: str) -> str:
    """The one way a replay command is written: ``lstm-harness replay CASE TARGET --oracle NAME``.

    ``target`` is shell-ready (a quoted TARGET, perhaps followed by options such as ``--in-process``);
    without one the command says that the implementation must be saved in a module first.
    """
    if not case_file:
        return ""
    command = f"lstm-harness replay {shlex.quote(case_file)} {target or NO_TARGET} --oracle {shlex.quote(oracle)}"
    if not target:
        return f"save your implementation in a module to replay: {command}"
    if target == NO_TARGET or target.startswith(NO_TARGET + " "):  # an adapted object no TARGET loads
        return f"save the object you gave harness.adapt in a module to replay: {command}"
    return command


@dataclass
class Case:
    """One check's arrays, all of dtype ``dtype``. Time-major; see :mod:`harness.contract`."""

    variant: str
    dtype: str
    x: np.ndarray  # (T, B, D)
    h0: np.ndarray  # (B, H)
    c0: np.ndarray  # (B, H)
    params: dict[str, np.ndarray]
    dy: np.ndarray  # (T, B, H)
    dh_T: np.ndarray  # (B, H)
    dc_T: np.ndarray  # (B, H)
    ln_eps: float = DEFAULT_LN_EPS
    spec: CaseSpec | None = field(default=None, compare=False)
    #: The layer structure the arrays are drawn for (see :mod:`harness.structure`): with the default one,
    #: every shape is as above; otherwise parameter names are prefixed and the states gain a leading axis.
    structure: Structure = field(default_factory=Structure)
    #: (B,) int64 valid lengths, when the structure has ``lengths``; None means every row has length T.
    lengths: np.ndarray | None = None

    @property
    def T(self) -> int:
        return self.x.shape[0]

    @property
    def B(self) -> int:
        return self.x.shape[1]

    @property
    def D(self) -> int:
        return self.x.shape[2]

    @property
    def H(self) -> int:
        """The cell's hidden size (c0's features; h0 has the projection size when there is one)."""
        return self.c0.shape[-1]

    @property
    def upstream(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return self.dy, self.dh_T, self.dc_T

    def arrays(self) -> dict[str, np.ndarray]:
        """Inputs and parameters by gradient key (x, h0, c0, W, ...)."""
        return {"x": self.x, "h0": self.h0, "c0": self.c0, **self.params}

    def astype(self, dtype: str) -> Case:
        """The same values in another dtype. Upcasting float32 to float64 is exact, which is how an
        oracle sees exactly the numbers the implementation received."""
        cast = lambda a: np.asarray(a, dtype=dtype)  # noqa: E731
        return dataclasses.replace(
            self,
            dtype=dtype,
            x=cast(self.x),
            h0=cast(self.h0),
            c0=cast(self.c0),
            params={k: cast(v) for k, v in self.params.items()},
            dy=cast(self.dy),
            dh_T=cast(self.dh_T),
            dc_T=cast(self.dc_T),
        )

    def copy(self) -> Case:
        return dataclasses.replace(
            self,
            x=self.x.copy(),
            h0=self.h0.copy(),
            c0=self.c0.copy(),
            params={k: v.copy() for k, v in self.params.items()},
            dy=self.dy.copy(),
            dh_T=self.dh_T.copy(),
            dc_T=self.dc_T.copy(),
            lengths=None if self.lengths is None else self.lengths.copy(),
        )

    def digest(self) -> str:
        """12 hex digits of SHA-256 over everything that defines the case: variant, dtype, epsilon and
        every array's dtype, shape and bytes. Equal digests mean the same numbers, bit for bit."""
        h = hashlib.sha256(f"{self.variant}|{self.dtype}|{self.ln_eps!r}".encode())
        if not self.structure.is_default:  # the default structure keeps the digests of earlier case files
            h.update(f"|structure:{sorted(self.structure.to_dict().items())!r}".encode())
        if self.lengths is not None:
            h.update(f"|lengths:{np.asarray(self.lengths, dtype=np.int64).tolist()!r}".encode())
        for name, value in (("x", self.x), ("h0", self.h0), ("c0", self.c0), ("dy", self.dy), ("dh_T", self.dh_T),
                            ("dc_T", self.dc_T), *sorted(self.params.items())):
            a = np.ascontiguousarray(value)
            h.update(f"|{name}:{a.dtype.str}:{a.shape}|".encode())
            h.update(a.tobytes())
        return h.hexdigest()[:12]

    def shape_text(self) -> str:
        return f"T={self.T}, B={self.B}, D={self.D}, H={self.H}, {self.dtype}"

    def info(self) -> dict[str, Any]:
        """What a record says of its case: shapes, dtype, and the spec (with its seed) that rebuilds it."""
        out: dict[str, Any] = {"T": self.T, "B": self.B, "D": self.D, "H": self.H, "dtype": self.dtype}
        if not self.structure.is_default:
            out["structure"] = self.structure.to_dict()
        if self.lengths is not None:
            out["lengths"] = [int(n) for n in self.lengths]
        if self.spec is not None:
            out["seed"] = self.spec.seed
            out["spec"] = self.spec.to_dict()
        out["digest"] = self.digest()
        return out

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write every array and the spec to ``.npz``; :func:`load_case` restores it exactly."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        meta = {
            "variant": self.variant,
            "dtype": self.dtype,
            "ln_eps": self.ln_eps,
            "spec": self.spec.to_dict() if self.spec else None,
            "format": "lstm-harness case 1",
        }
        if not self.structure.is_default:
            meta["structure"] = self.structure.to_dict()
        arrays: dict[str, np.ndarray] = {
            "x": self.x, "h0": self.h0, "c0": self.c0, "dy": self.dy, "dh_T": self.dh_T, "dc_T": self.dc_T,
            "meta": np.array(json.dumps(meta)),
            **{f"param_{k}": v for k, v in self.params.items()},
        }
        if self.lengths is not None:
            arrays["lengths"] = np.asarray(self.lengths, dtype=np.int64)
        with atomic_path(path, suffix=".npz") as tmp:  # a run killed while saving leaves no half file
            np.savez(tmp, **cast(dict[str, Any], arrays))
        return path


#: The most bytes a case file may hold once decompressed, checked against what its members declare
#: before anything is inflated: a case is a few arrays of a small LSTM, not a gigabyte.
MAX_CASE_BYTES = 256 * 1024**2

_CORE = ("x", "h0", "c0", "dy", "dh_T", "dc_T")


def load_case(path: str | os.PathLike[str]) -> Case:
    """Read a case written by :meth:`Case.save`, checking it first: a ValueError says what is wrong.

    A case file may come from anywhere (a report moved between machines, a bug report), so it is
    read like untrusted input: sizes are checked from the zip directory before any member is
    decompressed; then the metadata, the names of the arrays, their dtype, shapes consistent with one
    T, B, D, H and the variant, and finite values.
    """
    import zipfile

    try:
        with zipfile.ZipFile(path) as zf:
            members = zf.infolist()
            if len(members) > 64:
                raise ValueError(f"{path}: {len(members)} arrays; a case file holds at most 64")
            total = sum(m.file_size for m in members)
            if total > MAX_CASE_BYTES:
                raise ValueError(f"{path}: its arrays would take {total / 1024**2:.0f} MiB once decompressed; a "
                                 f"case file may take at most {MAX_CASE_BYTES / 1024**2:.0f} MiB")
            for member in members:  # each array's own header must agree with the size its member declares
                _check_header(zf, member, path)
    except (zipfile.BadZipFile, OSError, EOFError) as exc:
        raise ValueError(f"{path}: not a case file (.npz): {exc}") from None
    with np.load(path, allow_pickle=False) as data:
        names = set(data.files)
        missing = [k for k in ("meta", *_CORE) if k not in names]
        if missing:
            raise ValueError(f"{path}: missing arrays {missing}")
        try:
            meta = json.loads(str(data["meta"]))
            variant, dtype, ln_eps = meta["variant"], meta["dtype"], float(meta["ln_eps"])
            spec = CaseSpec(**meta["spec"]) if meta.get("spec") else None
            structure = Structure.from_dict(meta["structure"]) if meta.get("structure") else Structure()
        except Exception as exc:
            raise ValueError(f"{path}: unreadable metadata ({type(exc).__name__}: {exc})") from None
        wrong = structure.problems(variant if variant in VARIANTS else None)
        if wrong:
            raise ValueError(f"{path}: its structure is not valid: {'; '.join(wrong)}")
        if variant not in VARIANTS:
            raise ValueError(f"{path}: variant {variant!r} is not one of {sorted(VARIANTS)}")
        if dtype not in DEFAULT_DTYPES:
            raise ValueError(f"{path}: dtype {dtype!r} is not one of {list(DEFAULT_DTYPES)}")
        if not (np.isfinite(ln_eps) and ln_eps > 0):
            raise ValueError(f"{path}: ln_eps must be a positive number, got {ln_eps!r}")
        params = {k[len("param_"):]: data[k] for k in data.files if k.startswith("param_")}
        unexpected = sorted(names - {"meta", "lengths", *_CORE} - {f"param_{k}" for k in params})
        if unexpected:
            raise ValueError(f"{path}: unexpected arrays {unexpected}")
        expected_params = tuple(param_shapes(variant, structure, D=1, H=1))
        if sorted(params) != sorted(expected_params):
            where = f" in the structure {structure.describe()}" if not structure.is_default else ""
            raise ValueError(f"{path}: the {variant} variant has parameters {list(expected_params)}{where}, the "
                             f"file has {sorted(params)}")
        if structure.lengths != ("lengths" in names):
            raise ValueError(f"{path}: " + ("its structure has lengths but the file has no lengths array"
                                            if structure.lengths else
                                            "the file has a lengths array but its structure has no lengths"))
        lengths = data["lengths"] if "lengths" in names else None
        arrays = {k: data[k] for k in _CORE}
    case = Case(variant=variant, dtype=dtype, x=arrays["x"], h0=arrays["h0"], c0=arrays["c0"], params=params,
                dy=arrays["dy"], dh_T=arrays["dh_T"], dc_T=arrays["dc_T"], ln_eps=ln_eps, spec=spec,
                structure=structure, lengths=lengths)
    _check_arrays(case, path)
    return case


def _check_header(zf: Any, member: Any, path: Any) -> None:
    """The .npy header of one member: a plain dtype, and a shape whose bytes fit the declared size."""
    from numpy.lib import format as npy

    with zf.open(member) as fh:
        try:
            version = npy.read_magic(fh)
            shape, _fortran, dtype = (npy.read_array_header_1_0(fh) if version == (1, 0)
                                      else npy.read_array_header_2_0(fh))
        except ValueError as exc:
            raise ValueError(f"{path}: {member.filename} is not a NumPy array ({exc})") from None
    if dtype.hasobject:
        raise ValueError(f"{path}: {member.filename} holds Python objects; a case holds numbers only")
    if int(np.prod(shape, dtype=np.float64)) * dtype.itemsize > member.file_size:
        raise ValueError(f"{path}: {member.filename} claims shape {shape} ({dtype}), more than its "
                         f"{member.file_size} bytes")


def _check_arrays(case: Case, path: Any) -> None:
    """Dtypes, shapes consistent with one T, B, D, H, the variant and the structure, lengths in 1..T, and
    finite values."""
    everything = {**case.arrays(), "dy": case.dy, "dh_T": case.dh_T, "dc_T": case.dc_T}
    for name, array in everything.items():
        if array.dtype != np.dtype(case.dtype):
            raise ValueError(f"{path}: {name} has dtype {array.dtype}, the case is {case.dtype}")
    structure = case.structure
    state_rank = 3 if structure.layered else 2
    if case.x.ndim != 3 or case.h0.ndim != state_rank or case.c0.ndim != state_rank:
        want = "(L * dirs, B, H)" if structure.layered else "(B, H)"
        raise ValueError(f"{path}: x must be (T, B, D) and h0 {want}; got x {case.x.shape}, h0 {case.h0.shape}")
    T, B, D = case.x.shape
    H = case.c0.shape[-1]
    if min(T, B, D, H) < 1:
        raise ValueError(f"{path}: T, B, D and H must all be at least 1; got {T}, {B}, {D}, {H}")
    states = structure.state_shapes(B=B, H=H)
    shapes = {"x": (T, B, D), **states, "dy": structure.output_shape(T=T, B=B, H=H), "dh_T": states["h0"],
              "dc_T": states["c0"], **param_shapes(case.variant, structure, D=D, H=H)}
    where = f", {structure.describe()}" if not structure.is_default else ""
    for name, array in everything.items():
        if array.shape != shapes[name]:
            raise ValueError(f"{path}: {name} has shape {array.shape}; with T={T}, B={B}, D={D}, H={H} "
                             f"({case.variant}{where}) it must be {shapes[name]}")
        if not np.all(np.isfinite(array)):
            raise ValueError(f"{path}: {name} holds {int(np.sum(~np.isfinite(array)))} values that are not "
                             f"finite")
    if case.lengths is not None:
        lengths = case.lengths
        if lengths.dtype != np.int64 or lengths.shape != (B,):
            raise ValueError(f"{path}: lengths must be int64 of shape ({B},) (one per batch row); got "
                             f"{lengths.dtype} {lengths.shape}")
        if lengths.size and (lengths.min() < 1 or lengths.max() > T):
            raise ValueError(f"{path}: lengths must lie in 1..T={T}; got {lengths.tolist()}")


def _check_spec(spec: CaseSpec) -> None:
    if spec.variant not in VARIANTS:
        raise InvalidArgument(f"variant: expected one of {sorted(VARIANTS)}, got {spec.variant!r}")
    if spec.dtype not in DEFAULT_DTYPES:
        raise InvalidArgument(f"dtype: expected one of {DEFAULT_DTYPES}, got {spec.dtype!r}")
    for dim in ("T", "B", "D", "H"):
        if getattr(spec, dim) < 1:
            raise InvalidArgument(f"{dim}: expected >= 1, got {getattr(spec, dim)}")
    if spec.variant == "layernorm" and spec.H < 2:
        raise InvalidArgument(f"H: the layernorm variant normalizes over H units and needs H >= 2, got {spec.H}")
    if spec.weight_scale not in WEIGHT_SCALES:
        raise InvalidArgument(f"weight_scale: expected one of {sorted(WEIGHT_SCALES)}, got {spec.weight_scale!r}")
    if spec.extra_scale not in EXTRA_SCALES:
        raise InvalidArgument(f"extra_scale: expected one of {sorted(EXTRA_SCALES)}, got {spec.extra_scale!r}")
    if spec.rows not in ROWS:
        raise InvalidArgument(f"rows: expected one of {ROWS}, got {spec.rows!r}")
    if spec.lengths not in LENGTHS:
        raise InvalidArgument(f"lengths: expected one of {LENGTHS}, got {spec.lengths!r}")
    wrong = spec.structure.problems(spec.variant)
    if wrong:
        raise InvalidArgument("; ".join(wrong))
    if not spec.structure.replace(lengths=False).is_default and spec.rows != "random":
        raise InvalidArgument(f"rows: near-constant rows are drawn in the default structure only; with "
                              f"{spec.structure.describe()} use rows='random'")
    if spec.cell_clip and spec.weight_scale == "overflow":
        raise InvalidArgument("cell_clip: a clipped case keeps its cells a margin away from the clip, which the "
                              "overflow regime's cell states leave no room for; use another weight_scale")


def build_case(spec: CaseSpec) -> Case:
    """Turn a spec into arrays. Deterministic: the same spec gives the same bits on every machine.

    A spec in the default structure gives the arrays it always gave. In another structure the parameters
    are those of :func:`harness.contract.param_shapes` (each cell's weights scaled to its own input size),
    the states those of :meth:`Structure.state_shapes`, the lengths (int64) drawn as ``spec.lengths`` says
    from a stream of their own, and the clip chosen from the case's numbers (:mod:`harness.clipping`).
    """
    _check_spec(spec)
    if not spec.structure.is_default:
        return _build_structured(spec)
    rng = np.random.default_rng(spec.seed)
    T, B, D, H = spec.T, spec.B, spec.D, spec.H
    # Pre-activation a = W x + R h + b with x ~ N(0, 1) and |h| < 1: weights of std s / sqrt(D + H)
    # give pre-activations of std about s.
    overflow = spec.weight_scale == "overflow"
    s = OVERFLOW_SCALES[spec.dtype] if overflow else WEIGHT_SCALES[spec.weight_scale]
    w_std = s / np.sqrt(D + H)
    if overflow and spec.variant != "layernorm":
        # The bias and the initial cell state carry the overflow; W and R stay at the saturating scale.
        # Weights of hundreds would multiply float32's rounding of saturated gates (1 - f is a multiple
        # of 6e-8 near f = 1) into gradient errors beyond any fixed tolerance, in every correct float32
        # implementation. LayerNorm has no bias and takes the magnitude of W x + R h away before any
        # exp, so there the weights themselves are at the overflow scale.
        w_std = WEIGHT_SCALES["saturating"] / np.sqrt(D + H)
    x = rng.standard_normal((T, B, D))
    if spec.state == "zero":
        h0, c0 = np.zeros((B, H)), np.zeros((B, H))
    else:
        h0 = np.tanh(rng.standard_normal((B, H)))
        c0 = rng.standard_normal((B, H)) * (s if overflow else 1.0)  # overflow: cell states as far out
    params: dict[str, np.ndarray] = {
        "W": rng.standard_normal((4 * H, D)) * w_std,
        "R": rng.standard_normal((4 * H, H)) * w_std,
    }
    e = EXTRA_SCALES[spec.extra_scale]
    if spec.variant in ("vanilla", "peephole"):
        params["b"] = rng.standard_normal(4 * H) * (s if overflow else s / 2)
    if spec.variant == "peephole":
        for name in ("p_i", "p_f", "p_o"):
            params[name] = rng.standard_normal(H) * e
    if spec.variant == "layernorm":
        if spec.gain == "near_zero":
            gamma = rng.standard_normal((5, H)) * 1e-3
        elif spec.gain == "random":
            gamma = rng.standard_normal((5, H)) * max(e, 0.1)
        else:
            gamma = 1.0 + rng.standard_normal((5, H)) * 0.1
        params["gamma"] = gamma
        params["beta"] = rng.standard_normal((5, H)) * e
    if spec.rows == "near_constant":
        params["W"], params["R"] = _near_constant_rows(spec, w_std)
    dy = rng.standard_normal((T, B, H))
    dh_T = rng.standard_normal((B, H))
    dc_T = rng.standard_normal((B, H))
    if spec.upstream == "y_only":
        dh_T[:] = 0.0
        dc_T[:] = 0.0
    elif spec.upstream == "final_only":
        dy[:] = 0.0
    case = Case(spec.variant, "float64", x, h0, c0, params, dy, dh_T, dc_T, ln_eps=spec.ln_eps, spec=spec)
    case = case.astype(spec.dtype)
    case.spec = spec
    return case


def _build_structured(spec: CaseSpec) -> Case:
    """:func:`build_case` for a spec in a structure other than the default (see there)."""
    structure = spec.structure.replace(cell_clip=None)
    rng = np.random.default_rng(spec.seed)
    T, B, D, H = spec.T, spec.B, spec.D, spec.H
    H_out = structure.h_out(H)
    overflow = spec.weight_scale == "overflow"
    s = OVERFLOW_SCALES[spec.dtype] if overflow else WEIGHT_SCALES[spec.weight_scale]
    states = structure.state_shapes(B=B, H=H)
    x = rng.standard_normal((T, B, D))
    if spec.state == "zero":
        h0, c0 = np.zeros(states["h0"]), np.zeros(states["c0"])
    else:
        h0 = np.tanh(rng.standard_normal(states["h0"]))
        c0 = rng.standard_normal(states["c0"]) * (s if overflow else 1.0)
    e = EXTRA_SCALES[spec.extra_scale]
    params: dict[str, np.ndarray] = {}
    for layer, _direction, prefix in structure.cells():
        D_in = D if layer == 0 else structure.dirs * H_out  # layer k > 0 reads the previous layer's y
        w_std = s / np.sqrt(D_in + H_out)
        if overflow and spec.variant != "layernorm":  # as in the default structure: see build_case
            w_std = WEIGHT_SCALES["saturating"] / np.sqrt(D_in + H_out)
        params[prefix + "W"] = rng.standard_normal((4 * H, D_in)) * w_std
        params[prefix + "R"] = rng.standard_normal((4 * H, H_out)) * w_std
        if spec.variant in ("vanilla", "peephole"):
            params[prefix + "b"] = rng.standard_normal(4 * H) * (s if overflow else s / 2)
        if spec.variant == "peephole":
            for name in ("p_i", "p_f", "p_o"):
                params[prefix + name] = rng.standard_normal(H) * e
        if spec.variant == "layernorm":
            if spec.gain == "near_zero":
                params[prefix + "gamma"] = rng.standard_normal((5, H)) * 1e-3
            elif spec.gain == "random":
                params[prefix + "gamma"] = rng.standard_normal((5, H)) * max(e, 0.1)
            else:
                params[prefix + "gamma"] = 1.0 + rng.standard_normal((5, H)) * 0.1
            params[prefix + "beta"] = rng.standard_normal((5, H)) * e
        if structure.proj_size:
            params[prefix + "proj"] = rng.standard_normal((structure.proj_size, H)) / np.sqrt(H)
    dy = rng.standard_normal(structure.output_shape(T=T, B=B, H=H))
    dh_T = rng.standard_normal(states["h0"])
    dc_T = rng.standard_normal(states["c0"])
    if spec.upstream == "y_only":
        dh_T[:] = 0.0
        dc_T[:] = 0.0
    elif spec.upstream == "final_only":
        dy[:] = 0.0
    lengths = _lengths(spec) if structure.lengths else None
    case = Case(spec.variant, "float64", x, h0, c0, params, dy, dh_T, dc_T, ln_eps=spec.ln_eps, spec=spec,
                structure=structure, lengths=lengths)
    case = case.astype(spec.dtype)
    if isinstance(spec.cell_clip, bool) and spec.cell_clip:
        # chosen on the numbers the implementation receives (after rounding to the dtype)
        clip = choose_clip(case.variant, structure, case.x, case.h0, case.c0, case.params, lengths)
        case.structure = structure.replace(cell_clip=clip)
    elif not isinstance(spec.cell_clip, bool):
        case = _clear_of_clip(case, structure.replace(cell_clip=float(spec.cell_clip)))
    case.spec = spec
    return case


#: How often x is redrawn for a given clip before the case is used as it is.
REDRAWS = 16


def _clear_of_clip(case: Case, structure: Structure) -> Case:
    """The case with the given clip, x redrawn (from streams of its own) until every cell value keeps
    :data:`harness.clipping.MARGIN` away from the clip. After :data:`REDRAWS` tries the last draw stands:
    a cell may then sit near the clip, where the derivative jumps."""
    clip = structure.cell_clip
    assert clip is not None and case.spec is not None
    for k in range(REDRAWS + 1):
        if k:
            rng = np.random.default_rng([case.spec.seed, 3, k])
            case.x = rng.standard_normal(case.x.shape).astype(case.dtype)
        values = cell_values(case.variant, structure, case.x, case.h0, case.c0, case.params, case.lengths, clip)
        if not values.size or np.min(np.abs(values - clip)) >= MARGIN:
            break
    case.structure = structure
    return case


def structure_fields(structure: Structure, *, lengths: str = "random") -> dict[str, Any]:
    """The :class:`CaseSpec` fields of cases in ``structure`` (its clip, when it has one, as the value to
    keep the cells clear of), with lengths of the kind ``lengths`` when the structure has them."""
    clip = structure.cell_clip
    return dict(num_layers=structure.num_layers, bidirectional=structure.bidirectional,
                proj_size=structure.proj_size, cifg=structure.coupled_input_forget,
                cell_clip=False if clip is None else float(clip), lengths=lengths if structure.lengths else "none")


def _lengths(spec: CaseSpec) -> np.ndarray:
    """(B,) int64 lengths as ``spec.lengths`` says, from their own stream (every other array is the same
    as without them)."""
    rng = np.random.default_rng([spec.seed, 2])
    T, B = spec.T, spec.B
    if spec.lengths == "ones":
        return np.ones(B, dtype=np.int64)
    if spec.lengths == "equal":
        return np.full(B, rng.integers(1, T + 1), dtype=np.int64)
    lengths = rng.integers(1, T + 1, size=B)
    longest = rng.integers(B)
    lengths[longest] = T  # the longest row spans the whole sequence
    if B > 1 and T > 1 and np.all(lengths == T):  # rows of one length are the "equal" kind: one row shorter
        lengths[(longest + 1 + rng.integers(B - 1)) % B] = rng.integers(1, T)
    if B > 1 and len(set(lengths.tolist())) > 1 and np.all(np.diff(lengths) <= 0):
        lengths = lengths[::-1].copy()  # unsorted: never the decreasing order packed sequences may require
    return lengths.astype(np.int64)


def _near_constant_rows(spec: CaseSpec, w_std: float) -> tuple[np.ndarray, np.ndarray]:
    """W (4H, D) and R (4H, H) whose H rows within each gate block are one shared row plus a small
    deviation: every gate's pre-activations then agree across units up to a spread of about
    rho * sqrt(ln_eps), rho log-uniform in [0.01, 10], while their common value keeps the weight
    scale. These are the LayerNorm rows whose variance is comparable to eps (harness/conditioning.py).
    Drawn from their own stream, so every other array is the same as with ``rows="random"``.
    """
    rng = np.random.default_rng([spec.seed, 1])
    D, H = spec.D, spec.H
    rho = 10.0 ** rng.uniform(-2.0, 1.0)
    dev = rho * np.sqrt(spec.ln_eps) / np.sqrt(D + H)
    W = np.repeat(rng.standard_normal((4, 1, D)) * w_std, H, axis=1).reshape(4 * H, D)
    R = np.repeat(rng.standard_normal((4, 1, H)) * w_std, H, axis=1).reshape(4 * H, H)
    return W + rng.standard_normal(W.shape) * dev, R + rng.standard_normal(R.shape) * dev


def _weight_scales(names: tuple[str, ...]) -> st.SearchStrategy[str]:
    """The overflow regime a modest share of the draws (:data:`OVERFLOW_SHARE`) and the last thing
    shrinking keeps: a failure found there shrinks to ordinary magnitudes when it shows there too."""
    ordinary = tuple(n for n in names if n != "overflow")
    if not ordinary or len(ordinary) == len(names):
        return st.sampled_from(names)
    cut = round(1000 * (1 - OVERFLOW_SHARE))
    return st.integers(0, 999).flatmap(lambda k: st.sampled_from(ordinary) if k < cut else st.just("overflow"))


def _dim(name: str, lo: int, hi: int, special: tuple[int, ...] = (1,)) -> st.SearchStrategy[int]:
    """A dimension with its small special values (1 above all) drawn often, not only by chance."""
    specials = [v for v in special if lo <= v <= hi]
    base = st.integers(lo, hi)
    return st.one_of(st.sampled_from(specials), base) if specials else base


#: One in this many drawn cases is in a structure other than the default, when structures are drawn, so
#: that most cases stay as they are in the default structure; in each of those, each feature is on or off
#: with equal chance, so that features meet (a reverse direction over lengths, a projection in a stack)
#: as often as they occur alone. Every draw shrinks to the feature being off, and the first to the
#: default structure.
STRUCTURED_ONE_IN = 3

_STRUCTURED_DRAW = st.sampled_from((False,) * (STRUCTURED_ONE_IN - 1) + (True,))

#: The most layers a drawn structure has.
MAX_LAYERS = 3


def _feature(draw: Any, name: str) -> bool:
    return bool(draw(st.booleans(), label=name))


def drawable_features(variant: str, features: frozenset[str] | set[str] | tuple[str, ...], *,
                      max_H: int) -> frozenset[str]:
    """The structure features of ``features`` that a drawn case of ``variant`` can have when H is at
    most ``max_H``: LayerNorm has no projection or clip, and a projection needs H >= 2."""
    out = set(features)
    if variant == "layernorm":  # LayerNorm with a projection or a clip is not defined
        out -= {"proj", "clip"}
    if max_H < 2:  # a projection makes h smaller than the cell (LSTMP; torch.nn.LSTM requires proj_size < H)
        out.discard("proj")
    return frozenset(out)


def _structure_fields(draw: Any, *, variant: str, structure: Structure | None, H: int, weight_scale: str,
                      features: frozenset[str], require: frozenset[str], unsorted: bool
                      ) -> tuple[dict[str, Any], tuple[str, ...]]:
    """The CaseSpec fields of the structure: ``structure`` exactly (lengths drawn when it has them),
    or, when it is None, a drawn structure using only ``features`` (see :data:`STRUCTURED_ONE_IN`),
    with every feature of ``require`` on; and the choices drawn that the structure does not use, those
    not at their simplest value (see :func:`_folded_seed`). ``unsorted``: lengths of the "random" kind only."""
    kinds = st.just("random") if unsorted else st.sampled_from(LENGTHS[1:])
    if structure is not None:
        kind = draw(kinds, label="lengths") if structure.lengths else "none"
        return structure_fields(structure, lengths=kind), ()
    if not features:
        return {}, ()
    # Every choice is drawn whatever the earlier ones were, so that a case has the same number of choices
    # in any structure: Hypothesis's target phase changes one choice at a time and replays the rest, and a
    # change that asks for a choice the case did not have (a feature switched on that draws its size) is
    # an overrun. Conditional draws here made that phase spin on overruns (at a budget of 1000, some 45,000
    # attempts for 450 cases).
    structured = draw(_STRUCTURED_DRAW, label="structured") or bool(require)
    on = {name: _feature(draw, name) for name in FEATURES}
    if require:
        on = {name: name in require for name in FEATURES}
    num_layers = draw(st.integers(2, MAX_LAYERS), label="num_layers")
    lengths = draw(kinds, label="lengths")
    proj_size = draw(st.integers(1, max(1, H - 1)), label="proj_size")
    drawable = set(drawable_features(variant, features, max_H=H))
    if weight_scale == "overflow":  # no room for a margin around a clip there
        drawable.discard("clip")
    used = {name for name in drawable if on[name]} if structured else set()
    unused = tuple(f"{name}:on" for name in FEATURES if on[name] and name not in used)
    # A feature's size, drawn and unused, with the value it shrinks to: (feature, choice, value, simplest).
    sizes = (("layers", "num_layers", num_layers, 2), ("lengths", "lengths", lengths, LENGTHS[1]),
             ("proj", "proj_size", proj_size, 1))
    unused += tuple(f"{choice}:{value}" for feature, choice, value, simplest in sizes
                    if feature not in used and value != simplest)
    if not structured:
        return {}, unused
    return {
        "num_layers": num_layers if "layers" in used else 1,
        "bidirectional": "bidirectional" in used,
        "lengths": lengths if "lengths" in used else "none",
        "proj_size": proj_size if "proj" in used else 0,
        "cifg": "cifg" in used,
        "cell_clip": "clip" in used,
    }, unused


_DEFAULT_STRUCTURE = Structure()


@st.composite
def _specs(draw, *, variants, dtypes, max_T, max_B, max_D, max_H, weight_scales, ln_eps, structure, features,
           require, unsorted):
    variant = draw(st.sampled_from(variants), label="variant")
    dtype = draw(st.sampled_from(dtypes), label="dtype")
    min_H = 2 if variant == "layernorm" or "proj" in require else 1
    if structure is not None:  # a fixed projection of P features: cells of more than P units (as drawn ones have)
        min_H = max(min_H, structure.proj_size + 1)
    least = 2 if unsorted else 1  # rows in an order other than decreasing need two rows and two steps
    T = draw(_dim("T", least, max_T), label="T")
    B = draw(_dim("B", least, max_B), label="B")
    D = draw(_dim("D", 1, max_D), label="D")
    # H drawn independently of D, so D != H is the common case, with H == D and H == 1 sought too.
    H = draw(st.one_of(_dim("H", min_H, max_H), st.just(max(min_H, min(D, max_H)))), label="H")
    if (structure is not None and structure.cell_clip is not None) or "clip" in require:  # no room for a clip's margin
        weight_scales = tuple(w for w in weight_scales if w != "overflow") or ("saturating",)
    weight_scale = draw(_weight_scales(weight_scales), label="weight_scale")
    # Near-constant rows put each gate's spread at about sqrt(ln_eps) under a common value of the weight
    # scale; under the overflow scale that is a spread of 1e-8 relative to the value, which the finite
    # difference oracle cannot resolve (it reports a dW off by a factor of 10 where PyTorch, TensorFlow
    # and JAX agree with the implementation), so the two are not combined.
    near_constant_allowed = variant == "layernorm" and weight_scale != "overflow"
    fields, unused = _structure_fields(draw, variant=variant, structure=structure, H=H, weight_scale=weight_scale,
                                       features=features, require=require, unsorted=unsorted)
    if not CaseSpec(**fields).structure.replace(lengths=False).is_default:
        near_constant_allowed = False  # near-constant rows are drawn in the default structure only
    seed = draw(st.integers(0, 2**32 - 1), label="seed")
    state = draw(st.sampled_from(("random", "zero")), label="state")
    extra_scale = draw(st.sampled_from(tuple(EXTRA_SCALES)), label="extra_scale")
    gain = draw(st.sampled_from(GAINS), label="gain")
    if variant == "vanilla" and extra_scale != next(iter(EXTRA_SCALES)):  # peephole weights, LayerNorm's gains
        unused += (f"extra_scale:{extra_scale}",)
    if variant != "layernorm" and gain != GAINS[0]:
        unused += (f"gain:{gain}",)
    return CaseSpec(
        variant=variant,
        dtype=dtype,
        T=T, B=B, D=D, H=H,
        seed=_folded_seed(seed, unused),
        weight_scale=weight_scale,
        state=state,
        extra_scale=extra_scale,
        gain=gain,
        upstream=draw(st.sampled_from(("all", "y_only", "final_only")), label="upstream"),
        rows=draw(st.sampled_from(ROWS), label="rows") if near_constant_allowed else "random",
        ln_eps=ln_eps,
        **fields,
    )


def _folded_seed(seed: int, unused: tuple[str, ...]) -> int:
    """The seed of a case's numbers, with the choices the case does not use folded in.

    Every choice is drawn in every case (see :func:`_structure_fields`), also those that a case does not use:
    the structure's sizes and features in the default structure, the LayerNorm gains of a vanilla case.
    Two draws that differ only there would make the same case, and Hypothesis draws many such (its target
    phase changes one choice at a time): half of a 60-case search were repeats. Folded into the seed,
    such a choice gives the case other numbers instead. Unused choices at their simplest value change
    nothing, so a draw that has them there (a shrunk case, as a rule) keeps its seed.
    """
    if not unused:
        return seed
    return derived_seed(f"{seed}|{'|'.join(unused)}", bits=32)


def derived_seed(text: str, *, bits: int) -> int:
    """A seed of ``bits`` bits that ``text`` determines, the same in every process and on every host (unlike
    ``hash``, which Python salts per process)."""
    digest = hashlib.sha256(text.encode()).digest()
    return int.from_bytes(digest[: bits // 8], "little")


def case_specs(
    *,
    variants: tuple[str, ...] | list[str] = ("vanilla",),
    dtypes: tuple[str, ...] | list[str] = DEFAULT_DTYPES,
    max_T: int = 8,
    max_B: int = 4,
    max_D: int = 8,
    max_H: int = 8,
    weight_scales: tuple[str, ...] | list[str] = tuple(WEIGHT_SCALES),
    ln_eps: float = DEFAULT_LN_EPS,
    structure: Structure | None = _DEFAULT_STRUCTURE,
    features: frozenset[str] | set[str] | tuple[str, ...] = FEATURES,
    require: frozenset[str] | set[str] | tuple[str, ...] = (),
    unsorted_lengths: bool = False,
) -> st.SearchStrategy[CaseSpec]:
    """Strategy for :class:`CaseSpec`. Arguments are validated up front.

    ``structure``: the layer structure of every case (its lengths drawn when it has them: all equal, all
    1 or unsorted random); None draws structures, as for an implementation that is configurable: up to
    :data:`MAX_LAYERS` layers, both directions, lengths, projections, CIFG and clipping, each in a modest
    share of the cases (:data:`STRUCTURED_ONE_IN`), shrinking towards the default structure. ``features``
    (of :data:`harness.structure.FEATURES`) are those drawn structures may use (what some oracle computes);
    ``require`` (of ``features``, drawable in every variant: :func:`drawable_features`): every drawn
    structure has these features on and no other (a search that makes sure a feature is checked: alone,
    so that its minimal failing case names it, and in few structures, each a build or trace for some
    oracles). ``unsorted_lengths``: every case has lengths in an order other than decreasing (the "random" kind,
    B >= 2, T >= 2), in ``structure`` when it has lengths, else with ``require`` holding "lengths".
    """
    variants, dtypes, weight_scales = tuple(variants), tuple(dtypes), tuple(weight_scales)
    if not variants or any(v not in VARIANTS for v in variants):
        raise InvalidArgument(f"variants: expected a non-empty subset of {sorted(VARIANTS)}, got {variants!r}")
    if not dtypes or any(d not in DEFAULT_DTYPES for d in dtypes):
        raise InvalidArgument(f"dtypes: expected a non-empty subset of {DEFAULT_DTYPES}, got {dtypes!r}")
    if not weight_scales or any(w not in WEIGHT_SCALES for w in weight_scales):
        raise InvalidArgument(
            f"weight_scales: expected a non-empty subset of {sorted(WEIGHT_SCALES)}, got {weight_scales!r}"
        )
    for name, value in (("max_T", max_T), ("max_B", max_B), ("max_D", max_D), ("max_H", max_H)):
        if not isinstance(value, int) or value < 1:
            raise InvalidArgument(f"{name}: expected an int >= 1, got {value!r}")
    if "layernorm" in variants and max_H < 2:
        raise InvalidArgument(f"max_H: the layernorm variant needs H >= 2, so max_H >= 2; got {max_H}")
    if not ln_eps > 0:
        raise InvalidArgument(f"ln_eps: expected a positive float, got {ln_eps!r}")
    if structure is not None:
        if not isinstance(structure, Structure):
            raise InvalidArgument(f"structure: expected a harness.structure.Structure or None (draw structures), "
                                  f"got {type(structure).__name__}")
        for variant in variants:
            wrong = structure.problems(variant)
            if wrong:
                raise InvalidArgument(f"structure: {'; '.join(wrong)}")
        if structure.proj_size >= max_H:
            raise InvalidArgument(f"max_H: a structure with proj_size={structure.proj_size} has cells of more than "
                                  f"{structure.proj_size} units (a projection to fewer features, as torch.nn.LSTM "
                                  f"requires), so max_H >= {structure.proj_size + 1}; got {max_H}")
    unknown = sorted(set(features) - set(FEATURES))
    if unknown:
        raise InvalidArgument(f"features: expected a subset of {FEATURES}, got unknown {unknown}")
    require = frozenset(require)
    if require:
        if structure is not None:
            raise InvalidArgument(f"require: features are required of drawn structures only (structure=None), "
                                  f"got structure={structure!r}")
        for variant in variants:
            cannot = sorted(require - drawable_features(variant, features, max_H=max_H))
            if cannot:
                raise InvalidArgument(f"require: expected features a drawn {variant} case can have (of "
                                      f"{sorted(drawable_features(variant, features, max_H=max_H))}), got {cannot}")
    if not isinstance(unsorted_lengths, bool):
        raise InvalidArgument(f"unsorted_lengths: expected a bool, got {unsorted_lengths!r}")
    if unsorted_lengths:
        has_lengths = structure.lengths if structure is not None else "lengths" in require
        if not has_lengths:
            raise InvalidArgument(f"unsorted_lengths: needs cases with lengths (a structure with lengths, or "
                                  f"require with 'lengths'), got structure={structure!r}, require={sorted(require)}")
        if max_B < 2 or max_T < 2:
            raise InvalidArgument(f"unsorted_lengths: needs max_B >= 2 and max_T >= 2 (two rows, two steps), got "
                                  f"max_B={max_B}, max_T={max_T}")
    return _specs(
        variants=variants, dtypes=dtypes, max_T=max_T, max_B=max_B, max_D=max_D, max_H=max_H,
        weight_scales=weight_scales, ln_eps=float(ln_eps), structure=structure, features=frozenset(features),
        require=require, unsorted=unsorted_lengths,
    )


def cases(**kwargs: Any) -> st.SearchStrategy[Case]:
    """Strategy for :class:`Case`; takes the keyword arguments of :func:`case_specs`."""
    return case_specs(**kwargs).map(build_case)


# Named profiles, chosen by HYPOTHESIS_PROFILE (tests) or --profile (command line).
PROFILES: dict[str, dict[str, Any]] = {
    "dev": dict(max_examples=25, deadline=None),
    "ci": dict(
        max_examples=60,
        deadline=None,
        derandomize=True,
        print_blob=True,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    ),
    "thorough": dict(
        max_examples=500,
        deadline=None,
        print_blob=True,
        suppress_health_check=[HealthCheck.too_slow],
    ),
}


def register_profiles() -> None:
    """Register ``dev``, ``ci`` and ``thorough`` with Hypothesis (idempotent)."""
    for name, kwargs in PROFILES.items():
        settings.register_profile(name, **kwargs)
