"""The layer structure in the harness: declared structures, names and shapes, coordinates, structured cases
and their files, the strategies, per-case oracle skips, and whole certifications of a test-only layer."""

from __future__ import annotations

import json
import zipfile

import numpy as np
import pytest
from hypothesis import find, given, settings
from hypothesis.errors import InvalidArgument

import harness
from harness.cases import CaseSpec, build_case, case_file_name, case_specs, load_case
from harness.check import check_case
from harness.clipping import MARGIN, cell_values
from harness.compare import TOLERANCES, compare_arrays, decode_index, first_bad_by_direction
from harness.contract import ContractError, gradient_keys, param_shapes, quantities, quantity_specs, validate
from harness.records import format_direction_steps
from harness.structure import FEATURES, Structure
from harness.subject import InProcessSubject

torch = pytest.importorskip("torch")  # the test-only layer and oracle here are torch autograd

from tests.layer_support import ConfigurableTorchLayer, TorchLayer, TorchLayerOracle, layer_forward  # noqa: E402

STACKED_BI_PROJ = Structure(num_layers=2, bidirectional=True, proj_size=3)


# --------------------------------------------------------------------------------------------------
# Declared structures


class Minimal:
    variant = "vanilla"

    def forward(self, x, h0, c0, params, lengths=None):
        return x, h0, c0, None


def test_validate_reads_the_declared_structure():
    impl = Minimal()
    impl.num_layers, impl.bidirectional, impl.accepts_lengths = 2, True, True
    impl.proj_size, impl.coupled_input_forget, impl.cell_clip = 3, True, 2.5
    info = validate(impl)
    assert info.structure == Structure(2, True, 3, True, 2.5, True)
    assert not info.configurable
    assert validate(Minimal()).structure == Structure()


def test_an_implementation_with_with_structure_is_configurable():
    assert validate(ConfigurableTorchLayer()).configurable
    assert not validate(TorchLayer()).configurable


@pytest.mark.parametrize("attribute, value, start", [
    ("num_layers", 0, "num_layers: expected an int from 1 to 64, got 0"),
    ("num_layers", 10**6, "num_layers: expected an int from 1 to 64, got 1000000"),
    ("bidirectional", "yes", "bidirectional: expected True or False"),
    ("accepts_lengths", 1, "accepts_lengths: expected True or False"),
    ("proj_size", -1, "proj_size: expected an int from 0 (no projection) to 4096, got -1"),
    ("proj_size", 10**6, "proj_size: expected an int from 0 (no projection) to 4096, got 1000000"),
    ("cell_clip", 0.0, "cell_clip: expected a positive finite float or None"),
    ("with_structure", 3, "with_structure: expected a method"),
])
def test_bad_structure_attributes_are_named(attribute, value, start):
    impl = Minimal()
    setattr(impl, attribute, value)
    with pytest.raises(ContractError) as err:
        validate(impl)
    assert any(p.startswith(start) for p in err.value.problems), err.value.problems


def test_layernorm_with_a_projection_is_not_defined():
    impl = Minimal()
    impl.variant, impl.proj_size = "layernorm", 2
    with pytest.raises(ContractError, match="proj_size: a projection is not defined for the layernorm"):
        validate(impl)


# --------------------------------------------------------------------------------------------------
# Names and shapes


def test_names_and_shapes_of_a_stacked_bidirectional_projected_layer():
    # D=5, H=4, P=3, two directions: layer 1 reads 2 * 3 = 6 features; R reads h (P=3).
    T, B, D, H = 7, 2, 5, 4
    specs = quantity_specs("vanilla", STACKED_BI_PROJ)
    shape = {q: s.concrete_shape(T=T, B=B, D=D, H=H) for q, s in specs.items()}
    assert shape["y"] == (7, 2, 6)
    assert shape["h_T"] == shape["dh0"] == (4, 2, 3)
    assert shape["c_T"] == shape["dc0"] == (4, 2, 4)
    assert shape["dx"] == (7, 2, 5)
    assert shape["dl0.W"] == shape["dl0.reverse.W"] == (16, 5)
    assert shape["dl1.W"] == shape["dl1.reverse.W"] == (16, 6)
    assert shape["dl1.reverse.R"] == (16, 3)
    assert shape["dl0.proj"] == (3, 4)
    keys = gradient_keys("vanilla", STACKED_BI_PROJ)
    assert keys[:3] == ("x", "h0", "c0")
    assert keys[3:] == ("l0.W", "l0.R", "l0.b", "l0.proj", "l0.reverse.W", "l0.reverse.R", "l0.reverse.b",
                        "l0.reverse.proj", "l1.W", "l1.R", "l1.b", "l1.proj", "l1.reverse.W", "l1.reverse.R",
                        "l1.reverse.b", "l1.reverse.proj")
    assert quantities("vanilla", "backward", STACKED_BI_PROJ) == tuple("d" + k for k in keys)
    # The same shapes as param_shapes gives.
    for name, want in param_shapes("vanilla", STACKED_BI_PROJ, D=D, H=H).items():
        assert shape["d" + name] == want


def test_the_default_structure_and_lengths_alone_keep_todays_names():
    for structure in (None, Structure(), Structure(lengths=True)):
        assert gradient_keys("peephole", structure) == ("x", "h0", "c0", "W", "R", "b", "p_i", "p_f", "p_o")
        assert quantity_specs("vanilla", structure)["dW"].shape == ("4H", "D")


# --------------------------------------------------------------------------------------------------
# Coordinates


def test_coordinates_decode_layer_and_direction():
    specs = quantity_specs("vanilla", STACKED_BI_PROJ)
    # y (T, B, 2 * P = 6): feature 4 is the reverse direction's (features 3..5) unit 4 - 3 = 1.
    assert decode_index((3, 1, 4), specs["y"], 4, shape=(7, 2, 6)) == {
        "direction": "reverse", "t": 3, "batch": 1, "unit": 1}
    # h_T (L * dirs, B, P): row 3 = layer 1 * 2 + direction 1.
    assert decode_index((3, 0, 2), specs["h_T"], 4) == {"layer": 1, "direction": "reverse", "batch": 0, "unit": 2}
    assert decode_index((2, 1, 0), specs["dc0"], 4) == {"layer": 1, "direction": "forward", "batch": 1, "unit": 0}
    # dl1.reverse.W (4H, 6) with H=4: row 9 is gate g (rows 8..11), unit 1.
    assert decode_index((9, 2), specs["dl1.reverse.W"], 4) == {
        "layer": 1, "direction": "reverse", "gate": "g", "unit": 1, "input": 2}
    assert decode_index((2, 3), specs["dl0.proj"], 4) == {"layer": 0, "direction": "forward", "h_unit": 2, "unit": 3}


def test_a_one_direction_stack_names_layers_only():
    specs = quantity_specs("vanilla", Structure(num_layers=3))
    assert decode_index((2, 1, 0), specs["h_T"], 4) == {"layer": 2, "batch": 1, "unit": 0}
    assert decode_index((0, 1), specs["dl2.R"], 4) == {"layer": 2, "gate": "i", "unit": 0, "unit_in": 1}
    assert decode_index((1, 0, 3), specs["y"], 4) == {"t": 1, "batch": 0, "unit": 3}


def _compare_y(expected, actual, structure, lengths=None):
    spec = quantity_specs("vanilla", structure)["y"]
    base = dict(implementation="impl", oracle="oracle", variant="vanilla", dtype="float64", direction="forward",
                quantity="y")
    return compare_arrays(actual, expected, spec=spec, H=expected.shape[-1] // 2,
                          tol=TOLERANCES["float64"]["values"], tolerance_dtype="float64", base=base, lengths=lengths)


def test_the_first_bad_step_is_counted_per_direction():
    T, B, H = 5, 2, 3
    expected = np.zeros((T, B, 2 * H))
    actual = expected.copy()
    actual[3, 0, 1] = 1.0  # forward direction, t=3: its 4th step (step 3)
    actual[2, 1, H + 2] = 1.0  # reverse direction, t=2: it reads t=4, 3, 2, so its step 2
    rec = _compare_y(expected, actual, Structure(bidirectional=True))
    assert rec.first_bad_t == 2
    assert rec.first_bad_by_direction == {"forward": {"t": 3, "step": 3}, "reverse": {"t": 2, "step": 2}}
    assert "First step over tolerance by direction: forward t=3 (step 3), reverse t=2 (step 2): the reverse " \
           "direction departs first" in rec.message
    # With lengths the reverse direction starts at each row's last valid step: row 1 has length 3, so it
    # reads t=2 first (step 0).
    rec = _compare_y(expected, actual, Structure(bidirectional=True, lengths=True), lengths=np.array([5, 3]))
    assert rec.first_bad_by_direction["reverse"] == {"t": 2, "step": 0}
    # A padded step (t=4 of a row of length 3) comes before the reverse direction's start.
    actual2 = expected.copy()
    actual2[4, 1, H] = 1.0
    rec = _compare_y(expected, actual2, Structure(bidirectional=True, lengths=True), lengths=np.array([5, 3]))
    assert rec.first_bad_by_direction == {"reverse": {"t": 4, "step": -2}}
    assert "only the reverse direction departs" in rec.message and "a padded step" in rec.message
    assert rec.worst["coords"] == {"direction": "reverse", "t": 4, "batch": 1, "unit": 0}


def test_dx_is_read_as_each_directions_gradient_flows():
    # dx sums both directions; the forward direction's gradient flows from the last step down, the
    # reverse direction's from t=0 up: an error only at t=4 (T=5) is the forward one's first step.
    spec = quantity_specs("vanilla", Structure(bidirectional=True))["dx"]
    mismatch = np.zeros((5, 2, 3), dtype=bool)
    mismatch[4, 0, 1] = True
    found = first_bad_by_direction(mismatch, spec)
    assert found == {"forward": {"t": 4, "step": 0}, "reverse": {"t": 4, "step": 4}}
    assert format_direction_steps(found).endswith("the forward direction departs first")
    one_way = quantity_specs("vanilla", Structure(num_layers=2))["dx"]
    assert first_bad_by_direction(mismatch, one_way) is None


# --------------------------------------------------------------------------------------------------
# Structured cases


SPEC = CaseSpec(T=5, B=3, D=2, H=3, num_layers=2, bidirectional=True, proj_size=2, cifg=True, cell_clip=True,
                lengths="random", seed=11)


def test_build_case_gives_the_structures_shapes_and_lengths():
    case = build_case(SPEC)
    structure = case.structure
    assert structure.replace(cell_clip=None) == Structure(2, True, 2, True, None, True)
    assert case.h0.shape == case.dh_T.shape == (4, 3, 2)
    assert case.c0.shape == case.dc_T.shape == (4, 3, 3)
    assert case.dy.shape == (5, 3, 4)
    assert {k: v.shape for k, v in case.params.items()} == param_shapes("vanilla", structure, D=2, H=3)
    assert case.lengths.dtype == np.int64 and case.lengths.shape == (3,)
    assert 5 in case.lengths and case.lengths.min() >= 1
    assert build_case(SPEC).digest() == case.digest()  # deterministic
    assert "-L2bi-P2-cifg-clip-len-" in case_file_name("impl", case)
    assert "layers=2 bidirectional proj=2 cifg clip lengths=random" in SPEC.describe()


@pytest.mark.parametrize("kind", ["equal", "ones", "random"])
def test_lengths_kinds(kind):
    for seed in range(20):
        lengths = build_case(CaseSpec(T=6, B=4, lengths=kind, seed=seed)).lengths
        assert lengths.dtype == np.int64 and ((1 <= lengths) & (lengths <= 6)).all()
        if kind == "ones":
            assert (lengths == 1).all()
        elif kind == "equal":
            assert len(set(lengths.tolist())) == 1
        else:
            assert 6 in lengths
            assert len(set(lengths.tolist())) > 1  # rows of one length are the "equal" kind
            assert not (np.diff(lengths) <= 0).all()  # never in the decreasing order packing may require


def test_lengths_alone_leave_every_array_as_in_the_default_structure():
    plain, with_lengths = build_case(CaseSpec(seed=4)), build_case(CaseSpec(seed=4, lengths="random"))
    for name, value in plain.arrays().items():
        np.testing.assert_array_equal(value, with_lengths.arrays()[name])
    np.testing.assert_array_equal(plain.dy, with_lengths.dy)


def test_a_chosen_clip_clips_some_cells_and_keeps_every_cell_clear_of_it():
    clipped_any = False
    for seed in range(6):
        spec = CaseSpec(T=6, B=3, D=3, H=4, cell_clip=True, num_layers=2, seed=seed, weight_scale="large")
        case = build_case(spec)
        clip = case.structure.cell_clip
        values = cell_values("vanilla", case.structure, case.x, case.h0, case.c0, case.params, None, clip)
        assert np.min(np.abs(values - clip)) >= MARGIN
        # Independently: the torch layer's final cells lie within the clip, either on it or clear of it.
        t = {k: torch.tensor(v) for k, v in case.arrays().items()}
        _, _, c_T = layer_forward(case.structure, t["x"], t["h0"], t["c0"],
                                  {k: t[k] for k in case.params}, None)
        c = np.abs(c_T.numpy())
        assert (c <= clip + 1e-12).all()
        assert ((np.abs(c - clip) < 1e-12) | (c <= clip - MARGIN)).all()
        clipped_any |= bool((values > clip).any())
    assert clipped_any


def test_a_declared_clip_redraws_x_until_the_cells_are_clear():
    case = build_case(CaseSpec(T=6, B=3, cell_clip=0.5, seed=3))
    assert case.structure.cell_clip == 0.5
    values = cell_values("vanilla", case.structure, case.x, case.h0, case.c0, case.params, None, 0.5)
    assert np.min(np.abs(values - 0.5)) >= MARGIN


def test_structured_cases_round_trip_through_files(tmp_path):
    case = build_case(SPEC.replace(dtype="float32"))
    path = case.save(tmp_path / case_file_name("impl", case))
    back = load_case(path)
    assert back.digest() == case.digest()
    assert back.structure == case.structure
    np.testing.assert_array_equal(back.lengths, case.lengths)
    assert back.params.keys() == case.params.keys()


def _rewrite(path, out, **changes):
    with np.load(path) as data:
        arrays = {k: data[k] for k in data.files}
    for k, v in changes.items():
        if v is None:
            arrays.pop(k)
        else:
            arrays[k] = v
    np.savez(out, **arrays)
    return out


def test_a_structured_case_file_is_checked_against_its_structure(tmp_path):
    case = build_case(SPEC)
    path = case.save(tmp_path / "case.npz")
    with pytest.raises(ValueError, match="its structure has lengths but the file has no lengths array"):
        load_case(_rewrite(path, tmp_path / "a.npz", lengths=None))
    with pytest.raises(ValueError, match=r"lengths must lie in 1..T=5"):
        load_case(_rewrite(path, tmp_path / "b.npz", lengths=np.array([0, 5, 5])))
    with pytest.raises(ValueError, match=r"lengths must be int64 of shape \(3,\)"):
        load_case(_rewrite(path, tmp_path / "c.npz", lengths=np.array([1, 5])))
    with pytest.raises(ValueError, match=r"param_l1.W|l1.W has shape \(12, 3\)"):
        load_case(_rewrite(path, tmp_path / "d.npz", **{"param_l1.W": np.zeros((12, 3))}))
    with pytest.raises(ValueError, match=r"h0 has shape \(2, 3, 2\).*layers=2 bidirectional"):
        load_case(_rewrite(path, tmp_path / "e.npz", h0=np.zeros((2, 3, 2))))
    meta = json.loads(str(np.load(path)["meta"]))
    meta["structure"]["proj_size"] = -1
    with pytest.raises(ValueError, match="its structure is not valid: proj_size"):
        load_case(_rewrite(path, tmp_path / "f.npz", meta=np.array(json.dumps(meta))))
    assert zipfile.is_zipfile(path)


# --------------------------------------------------------------------------------------------------
# Strategies


def _find(condition, **kwargs):
    return find(case_specs(**kwargs), condition, settings=settings(max_examples=2000, database=None))


@pytest.mark.parametrize("feature, condition", [
    ("layers 3", lambda s: s.num_layers == 3),
    ("bidirectional", lambda s: s.bidirectional),
    ("lengths equal", lambda s: s.lengths == "equal"),
    ("lengths ones", lambda s: s.lengths == "ones"),
    ("lengths random", lambda s: s.lengths == "random"),
    ("projection", lambda s: s.proj_size > 0),
    ("cifg", lambda s: s.cifg),
    ("clip", lambda s: s.cell_clip is True),
])
def test_drawn_structures_reach_every_feature_and_shrink_to_it_alone(feature, condition):
    spec = _find(condition, structure=None)
    # Everything but the feature itself has shrunk to the default.
    assert sum([spec.num_layers > 1, spec.bidirectional, spec.proj_size > 0, spec.cifg, spec.cell_clip is True,
                spec.lengths != "none"]) == 1, spec


def _sample(n=300, **kwargs):
    specs = []

    @settings(max_examples=n, database=None, derandomize=True)
    @given(case_specs(**kwargs))
    def collect(spec):
        specs.append(spec)

    collect()
    return specs


def test_a_fixed_projection_gets_cells_larger_than_it():
    # torch.nn.LSTM(proj_size=2) raises on a cell of 2 units ("Odd number of params or hiddens given to a
    # bidirectional RNN" when its parameters are swapped in): every H drawn for it is above the projection.
    fixed = Structure(num_layers=2, bidirectional=True, proj_size=2, lengths=True)
    specs = _sample(100, structure=fixed, max_H=4)
    assert {s.H for s in specs} == {3, 4} and all(s.structure == fixed for s in specs)
    with pytest.raises(InvalidArgument, match=r"max_H: a structure with proj_size=4 .* so max_H >= 5; got 4"):
        case_specs(structure=Structure(proj_size=4), max_H=4)


def test_drawn_structures_shrink_to_the_default_and_mostly_stay_there():
    # Derandomized: with a random seed, find() stopped short of the minimum in 2 runs of 40 (a structured
    # case with T = B = D = H = 1), probably at the shrinker's cap on successful shrinks, which a condition
    # that accepts every case spends on every choice. This test pins the direction of the shrinking.
    minimal = find(case_specs(structure=None), lambda s: True,
                   settings=settings(max_examples=2000, database=None, derandomize=True))
    assert minimal.structure.is_default
    specs = _sample(structure=None)
    default = sum(s.structure.is_default for s in specs)
    assert 0.4 * len(specs) < default < 0.95 * len(specs)
    # A structure is never drawn for an implementation of a fixed one, the default included.
    assert all(s.structure.is_default for s in _sample(100))


@pytest.mark.parametrize("feature", ["layers", "bidirectional", "lengths", "proj", "cifg", "clip"])
def test_a_required_feature_is_on_in_every_drawn_case_and_no_other(feature):
    specs = _sample(60, structure=None, require={feature})
    assert all(s.structure.features() == {feature} for s in specs)
    assert feature != "proj" or all(s.H >= 2 for s in specs)
    assert feature != "clip" or all(s.weight_scale != "overflow" for s in specs)


@pytest.mark.parametrize("kwargs, message", [
    (dict(require={"proj"}, variants=("layernorm",), structure=None), r"require: .*layernorm.*got \['proj'\]"),
    (dict(require={"proj"}, max_H=1, structure=None), r"require: .*got \['proj'\]"),
    (dict(require={"clip"}, features={"layers"}, structure=None), r"require: .*got \['clip'\]"),
    (dict(require={"layers"}, structure=Structure()), "require: features are required of drawn structures only"),
])
def test_a_feature_that_cannot_be_drawn_cannot_be_required(kwargs, message):
    with pytest.raises(InvalidArgument, match=message):
        case_specs(**kwargs)


def test_layernorm_draws_no_projection_or_clip():
    specs = _sample(variants=("layernorm",), structure=None)
    assert not any(s.proj_size or s.cell_clip for s in specs)
    assert any(s.num_layers > 1 for s in specs)


def test_a_fixed_structure_is_drawn_exactly_with_lengths_of_every_kind():
    fixed = Structure(num_layers=2, bidirectional=True, lengths=True)
    for kind in ("equal", "ones", "random"):
        spec = _find(lambda s, kind=kind: s.lengths == kind, structure=fixed)
        assert (spec.num_layers, spec.bidirectional, spec.proj_size, spec.cifg, spec.cell_clip) == (2, True, 0, False,
                                                                                                  False)
    with pytest.raises(InvalidArgument, match="structure: proj_size"):
        case_specs(variants=("layernorm",), structure=Structure(proj_size=2))


# --------------------------------------------------------------------------------------------------
# Checks


def test_an_oracle_that_does_not_compute_the_structure_is_skipped_per_case():
    case = build_case(CaseSpec(T=3, B=2, bidirectional=True, seed=1))
    impl = ConfigurableTorchLayer()
    subject = InProcessSubject(impl, validate(impl))
    full, partial = TorchLayerOracle("full"), TorchLayerOracle("partial", frozenset({"layers"}))
    records = check_case(subject, [full, partial], case)
    skipped = [r for r in records if r.oracle == "partial"]
    assert skipped and all(r.status == "skip" for r in skipped)
    assert "partial does not compute bidirectional (computes layers)" in skipped[0].reason
    assert all(r.status == "pass" for r in records if r.oracle == "full")
    counts: dict[str, dict[str, int]] = {}
    records = check_case(subject, [full, partial], case, skipped=counts)
    assert {r.oracle for r in records} == {"full"}
    assert counts == {"partial": {"partial does not compute bidirectional (computes layers)": 1}}


def test_lengths_are_passed_only_when_the_structure_has_them():
    impl = ConfigurableTorchLayer()  # its forward asserts it
    subject = InProcessSubject(impl, validate(impl))
    for spec in (CaseSpec(seed=2), CaseSpec(seed=2, lengths="random"), CaseSpec(seed=2, num_layers=2)):
        execution = subject.execute(build_case(spec), backward=True)
        assert execution.forward_error is None and execution.backward_error is None


def test_an_isolated_worker_runs_structured_cases():
    from harness.isolation import IsolatedSubject

    case = build_case(SPEC)
    here = InProcessSubject(ConfigurableTorchLayer(), validate(ConfigurableTorchLayer())).execute(case, backward=True)
    with IsolatedSubject("tests.layer_support:ConfigurableTorchLayer") as isolated:
        there = isolated.execute(case, backward=True)
    assert there.forward_error is None and there.backward_error is None, there.forward_error
    for a, b in zip(here.forward, there.forward):
        np.testing.assert_array_equal(a, b)
    assert here.gradients.keys() == there.gradients.keys()


# --------------------------------------------------------------------------------------------------
# Whole certifications


ORACLES = [TorchLayerOracle("oracle-a"), TorchLayerOracle("oracle-b", frozenset({"layers", "lengths", "cifg"}))]


def test_a_correct_configurable_layer_is_certified_with_skips_counted():
    result = harness.certify(ConfigurableTorchLayer(), oracles=ORACLES, dtypes=["float64", "float32"],
                             max_examples=40, write_report=False)
    assert result.verdict == "certified", result.summary(verbose=False)
    counted = [r.skipped_cases for r in result.records if r.oracle == "oracle-b"]
    assert counted and all(sum(c.values()) > 0 and all("does not compute" in why for why in c) for c in counted)
    assert all("Note: oracle-b was skipped on" in r.message for r in result.records if r.oracle == "oracle-b")
    assert not any(r.skipped_cases for r in result.records if r.oracle == "oracle-a")
    assert any("cases by layer structure" in n for n in result.notes)
    prefixed = {r.quantity for r in result.records if r.quantity.startswith("dl")}
    assert prefixed  # structured cases were compared, under their prefixed names


def test_each_feature_is_checked_in_enough_cases_and_a_projection_bug_is_caught_at_the_default_budget():
    # The search draws a structure in one case of three and a projection only where H >= 2: at the default
    # budget a certification drew no projection in 600 cases and certified a wrong projection gradient.
    from harness.runner import MIN_FEATURE_CASES, RunSettings, feature_floor, run_checks

    assert [feature_floor(n) for n in (1, 12, 13, 48, 60, 500)] == [1, 1, 2, 4, 5, 5] and MIN_FEATURE_CASES == 5
    impl = ConfigurableTorchLayer()
    for budget, floor in ((None, 5), (30, 3), (3, 1)):  # the ci profile's 60 cases, then fewer
        stats: dict = {}
        run_checks(InProcessSubject(impl, validate(impl)), ORACLES[:1], dtype="float64",
                   run=RunSettings(max_examples=budget), stats=stats)
        assert all(stats["features"].get(f, 0) >= floor for f in FEATURES), (budget, stats["features"])
    # Only the features some oracle computes are sought.
    stats = {}
    run_checks(InProcessSubject(impl, validate(impl)), [TorchLayerOracle("some", frozenset({"layers", "cifg"}))],
               dtype="float64", run=RunSettings(max_examples=3), stats=stats)
    assert set(stats["features"]) == {"layers", "cifg"} and min(stats["features"].values()) >= 1
    result = harness.certify(ConfigurableTorchLayer(bugs=("projection_gradient_scaled",)), oracles=ORACLES[:1],
                             dtypes=["float64"], max_examples=10, write_report=False)
    assert result.verdict == "discrepancies", result.summary(verbose=False)
    failing = [r for r in result.records if r.status == "fail"]
    assert {r.quantity for r in failing} == {"dproj"}, {r.quantity for r in failing}
    assert all(Structure.from_dict(r.case["structure"]).features() == {"proj"} for r in failing)
    # The convention search's trial cases have no projection: what it says on top names what they leave out.
    assert result.diagnosis["status"] == "standard"
    assert result.diagnosis["headline"] == (
        "in one layer, one direction and full lengths it matches the standard LSTM as declared, its backward "
        "too; every failing case has a projection: the findings say where")
    assert "Every case that failed has a projection" in result.diagnosis["text"]


def test_a_fixed_structure_is_checked_in_exactly_that_structure():
    impl = TorchLayer(num_layers=2, bidirectional=True, accepts_lengths=True)
    result = harness.certify(impl, oracles=ORACLES[:1], dtypes=["float64"], max_examples=15, write_report=False)
    assert result.verdict == "certified", result.summary(verbose=False)
    assert {r.quantity for r in result.records if r.direction == "backward"} == {
        "d" + k for k in gradient_keys("vanilla", Structure(2, True, lengths=True))}
    for r in result.records:
        assert r.case["structure"]["num_layers"] == 2 and r.case["structure"]["bidirectional"]
    # The oracle that lacks bidirectional is skipped on every case, and says so.
    result = harness.certify(impl, oracles=ORACLES, dtypes=["float64", "float32"], max_examples=5, write_report=False)
    skipped = [r for r in result.records if r.oracle == "oracle-b"]
    assert skipped and all(r.status == "skip" and "skipped on every case" in r.reason for r in skipped)
    assert all(sum(r.skipped_cases.values()) >= 5 for r in skipped)
    # One reason for both dtypes (the counts live apart), so the summary lists it once.
    assert {r.dtype for r in skipped} == {"float64", "float32"} and len({r.reason for r in skipped}) == 1
    assert result.summary(verbose=False).count("skipped on every case") == 1


@pytest.mark.parametrize("bug, spec", [
    ("reverse_ignores_lengths", CaseSpec(T=4, B=3, bidirectional=True, lengths="random", seed=1)),
    ("padded_steps_update", CaseSpec(T=4, B=3, lengths="ones", seed=1)),
    ("gradient_through_clip", CaseSpec(T=4, B=3, cell_clip=True, weight_scale="large", seed=1)),
    ("separate_forget_gate", CaseSpec(T=4, B=3, cifg=True, seed=1)),
    ("layer_fed_h_T", CaseSpec(T=4, B=3, num_layers=2, seed=1)),
    ("projection_gradient_scaled", CaseSpec(T=4, B=3, H=3, proj_size=2, seed=1)),
])
def test_each_planted_bug_of_the_test_layer_departs_on_its_structure(bug, spec):
    impl = ConfigurableTorchLayer(bugs=(bug,))
    records = check_case(InProcessSubject(impl, validate(impl)), ORACLES[:1], build_case(spec))
    assert any(r.status == "fail" for r in records), bug
    correct = ConfigurableTorchLayer()
    assert all(r.ok for r in check_case(InProcessSubject(correct, validate(correct)), ORACLES[:1], build_case(spec)))


def test_a_broken_configurable_layer_is_caught_by_the_search():
    result = harness.certify(ConfigurableTorchLayer(bugs=("separate_forget_gate",)), oracles=ORACLES[:1],
                             dtypes=["float64"], max_examples=100, write_report=False)
    assert result.verdict == "discrepancies"
    failing = [r for r in result.records if r.status == "fail"]
    assert failing and all("cifg" in Structure.from_dict(r.case["structure"]).features() for r in failing)
    finding = result.findings[0]
    assert "cifg" in "\n".join(finding.lines())  # the minimal case names its structure


def test_diagnose_takes_a_fixed_layer_structure_in_its_own_structure():
    from harness.diagnose import diagnose

    found = diagnose(TorchLayer(num_layers=2, bidirectional=True))
    assert found.status == "standard", found.text()
    assert found.layer is None and found.hint == ""


def test_the_test_layer_matches_torch_nn_lstm():
    """The test oracle itself, against PyTorch where PyTorch computes the same layer (stacks, directions,
    projections, packed lengths)."""
    structure = Structure(num_layers=2, bidirectional=True, proj_size=2, lengths=True)
    case = build_case(CaseSpec(T=5, B=3, D=3, H=4, num_layers=2, bidirectional=True, proj_size=2, lengths="random",
                               seed=5))
    lstm = torch.nn.LSTM(3, 4, num_layers=2, bidirectional=True, proj_size=2).double()
    with torch.no_grad():
        for layer in range(2):
            for direction, suffix in ((0, ""), (1, "_reverse")):
                prefix = f"l{layer}." + ("reverse." if direction else "")
                getattr(lstm, f"weight_ih_l{layer}{suffix}").copy_(torch.tensor(case.params[prefix + "W"]))
                getattr(lstm, f"weight_hh_l{layer}{suffix}").copy_(torch.tensor(case.params[prefix + "R"]))
                getattr(lstm, f"bias_ih_l{layer}{suffix}").copy_(torch.tensor(case.params[prefix + "b"]))
                getattr(lstm, f"bias_hh_l{layer}{suffix}").zero_()
                getattr(lstm, f"weight_hr_l{layer}{suffix}").copy_(torch.tensor(case.params[prefix + "proj"]))
        packed = torch.nn.utils.rnn.pack_padded_sequence(torch.tensor(case.x), torch.tensor(case.lengths),
                                                         enforce_sorted=False)
        out, (h, c) = lstm(packed, (torch.tensor(case.h0), torch.tensor(case.c0)))
        y, _ = torch.nn.utils.rnn.pad_packed_sequence(out, total_length=5)
        t = {k: torch.tensor(v) for k, v in case.arrays().items()}
        ours = layer_forward(structure, t["x"], t["h0"], t["c0"], {k: t[k] for k in case.params}, case.lengths)
    for theirs, mine in zip((y, h, c), ours):
        np.testing.assert_allclose(mine.numpy(), theirs.numpy(), rtol=1e-12, atol=1e-12)


def test_replay_runs_a_structured_case_and_refuses_one_of_another_structure(tmp_path):
    from harness.api import InvalidArgument, replay

    case = build_case(SPEC)
    path = case.save(tmp_path / case_file_name("torch-layer", case))
    result = replay(path, ConfigurableTorchLayer(), oracles=ORACLES[:1])
    assert result.verdict == "certified"
    assert result.case.structure == case.structure
    assert all(r.case["structure"] == case.structure.to_dict() for r in result.records)
    with pytest.raises(InvalidArgument, match="case: its layer structure .* is not the one torch-layer computes"):
        replay(path, TorchLayer(num_layers=2), oracles=ORACLES[:1])


def test_the_structure_note_counts_cases_per_feature():
    from harness.unit import structure_note

    note = structure_note("loop", "float64", {"cases": 60, "features": {"layers": 9, "lengths": 4,
                                                                        "unsorted lengths": 3}})
    assert note == ("loop (float64): 60 cases by layer structure: 9 stacked, 0 bidirectional, 4 with lengths "
                    "(3 unsorted), 0 projected, 0 CIFG, 0 clipped")
    # a search with only some of the oracles (a parallel or split unit) draws its own cases: it says whose
    apart = structure_note("loop", "float32", {"cases": 5}, against=["torch-nn-lstm", "torch-composite"])
    assert apart.startswith("loop (float32, search vs torch-nn-lstm, torch-composite): 5 cases by layer structure")


def test_a_parallel_run_prints_one_structure_line_per_implementation_and_dtype(tmp_path):
    from harness import certify

    pytest.importorskip("onnx")  # an oracle of a second family
    result = certify("impls.loop:LoopLSTM", oracles=["finite-differences", "onnx-reference"], jobs=2,
                     max_examples=3, dtypes=["float64"], report_dir=tmp_path)
    (note,) = [n for n in result.notes if "by layer structure" in n]  # one line for the two searches
    drawn = {r.oracle: r.examples for r in result.records}  # each unit's cases: 3, and a few more for each feature
    total = drawn["finite-differences"] + drawn["onnx-reference"]
    assert total > 6 and note.startswith(f"loop (float64): {total} cases in 2 searches by layer structure: ")


def test_structure_notes_of_several_searches_merge_into_one_line():
    import pickle

    from harness.unit import merge_search_notes, structure_note

    a = structure_note("loop", "float64", {"cases": 60, "features": {"layers": 9, "lengths": 4,
                                                                     "unsorted lengths": 1}}, against=["x"])
    b = structure_note("loop", "float64", {"cases": 40, "features": {"layers": 1, "clip": 2, "lengths": 3,
                                                                     "unsorted lengths": 2}}, against=["y"])
    c = structure_note("loop", "float32", {"cases": 60, "features": {}}, against=["x"])
    a = pickle.loads(pickle.dumps(a))  # as a parallel child sends it
    merged = merge_search_notes(["other note", a, b, c])
    assert merged[0] == "other note" and merged[2] == c  # a single search's note stays as it was
    assert merged[1] == ("loop (float64): 100 cases in 2 searches by layer structure: 10 stacked, 0 bidirectional, "
                         "7 with lengths (3 unsorted), 0 projected, 0 CIFG, 2 clipped")


def test_drawn_structures_use_only_the_features_some_oracle_computes():
    specs = _sample(150, structure=None, features={"layers", "lengths"})
    assert all(s.structure.features() <= {"layers", "lengths"} for s in specs)
    assert any(s.num_layers > 1 for s in specs) and any(s.lengths != "none" for s in specs)
    # With no oracle that computes any feature, a configurable implementation gets the default structure only.
    from harness.runner import RunSettings, run_checks

    impl = ConfigurableTorchLayer()
    stats: dict = {}
    run_checks(InProcessSubject(impl, validate(impl)), [TorchLayerOracle("cell-only", frozenset())],
               dtype="float64", run=RunSettings(max_examples=20), stats=stats)
    assert stats["cases"] >= 20 and stats["features"] == {} and stats["skipped"] == {}
