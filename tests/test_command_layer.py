"""The command protocol for a whole layer: a program declares one structure (``--structure``) or reads each
call's from request.json (``--structures``); it is handed the layer's prefixed parameters, its layered states
and lengths.npy, certified in its own order of directions and states, and caught when it ignores the lengths;
the words of ``--structure``."""

from __future__ import annotations

import json
import pickle
import re
import shlex
import sys
from pathlib import Path

import numpy as np
import pytest

from harness import runner
from harness.api import certify
from harness.cases import CaseSpec, build_case, load_case
from harness.check import check_case
from harness.cli import main
from harness.command_protocol import CommandLSTM, command
from harness.contract import validate
from harness.runner import RunSettings, run_checks
from harness.structure import Structure
from harness.subject import InProcessSubject
from oracles.finite_diff import FiniteDifferenceOracle

SCRIPT = Path(__file__).parent / "commands" / "layer_lstm.py"
FD = ["--oracle", "finite-differences"]
LAYER = "layers=2 bidirectional lengths"


def _script(*flags: str) -> list[str]:
    return [sys.executable, str(SCRIPT), *flags]


def test_a_layered_call_hands_over_the_whole_layer(tmp_path):
    """request.json carries the structure; the files are the prefixed parameters, the (L * dirs, B, H) states and
    lengths.npy (int64, and no gradient asked of it); the gradients come back under the prefixed names."""
    log = tmp_path / "seen.jsonl"
    spy = tmp_path / "spy.py"
    spy.write_text(
        "import json, runpy, sys, pathlib, numpy as np\n"
        "req = pathlib.Path(sys.argv[-2])\n"
        "files = {p.name: [str(a.dtype), list(a.shape)] for p in req.glob('*.npy') for a in [np.load(p)]}\n"
        f"with open({str(log)!r}, 'a') as fh:\n"
        "    seen = {'request': json.loads((req / 'request.json').read_text()), 'files': files}\n"
        "    fh.write(json.dumps(seen) + '\\n')\n"
        f"sys.argv = [{str(SCRIPT)!r}, *sys.argv[1:]]\n"
        f"runpy.run_path({str(SCRIPT)!r}, run_name='__main__')\n")
    case = build_case(CaseSpec(variant="vanilla", dtype="float32", T=3, B=2, D=3, H=2, seed=4, num_layers=2,
                               bidirectional=True, lengths="ones"))
    assert case.structure == Structure.parse(LAYER)
    impl = CommandLSTM([sys.executable, str(spy)], structure=LAYER)
    y, h_T, c_T, cache = impl.forward(case.x, case.h0, case.c0, case.params, lengths=case.lengths)
    assert y.shape == (3, 2, 4) and h_T.shape == (4, 2, 2)
    assert np.all(y[1:] == 0) and np.all(y[0] != 0)  # every row has one step
    grads = impl.backward(case.dy, case.dh_T, case.dc_T, cache)
    assert set(grads) == {"x", "h0", "c0", *case.params} and "lengths" not in grads
    first, second = (json.loads(line) for line in log.read_text().splitlines())
    assert first["request"]["structure"] == {"num_layers": 2, "bidirectional": True, "proj_size": 0,
                                             "coupled_input_forget": False, "cell_clip": None, "lengths": True}
    assert first["files"]["lengths.npy"] == ["int64", [2]]
    assert first["files"]["h0.npy"] == ["float32", [4, 2, 2]]
    assert first["files"]["l1.reverse.W.npy"] == ["float32", [8, 4]]  # layer 1 reads both directions' y
    assert set(first["files"]) == {"x.npy", "h0.npy", "c0.npy", "lengths.npy", *(f"{k}.npy" for k in case.params)}
    assert set(second["files"]) == set(first["files"]) | {"dy.npy", "dh_T.npy", "dc_T.npy"}


def test_a_program_that_reads_its_structure_is_certified_in_drawn_structures():
    impl = command(_script(), structures="all")
    info = validate(impl)
    assert info.configurable and set(info.structures) == {"layers", "bidirectional", "lengths", "proj", "cifg",
                                                          "clip"}
    result = certify(impl, max_examples=4, oracles=["finite-differences"], dtypes=["float64"])
    assert result.verdict == "certified", result.details()
    (drawn,) = [n for n in result.notes if "by layer structure" in n]
    for feature in ("stacked", "bidirectional", "with lengths", "projected", "CIFG", "clipped"):
        assert re.search(rf"\b[1-9]\d* {feature}", drawn), drawn  # each feature checked in at least one case


@pytest.fixture
def one_search(monkeypatch):
    """One search per check: a failing program is caught and shrunk once, not searched again for a second
    discrepancy (every call of a program starts a Python process, and shrinking makes a hundred)."""
    monkeypatch.setattr(runner, "MAX_SEARCHES", 1)


def test_a_program_that_ignores_the_lengths_is_caught_and_its_replay_line_fails_again(tmp_path, capsys, one_search):
    cmd = shlex.join(_script("--ignore-lengths"))
    plain = command(cmd, structure=LAYER)
    assert plain.replay_arguments == f"--command {shlex.quote(cmd)} --structure {shlex.quote(LAYER)}"
    records = run_checks(InProcessSubject(plain, validate(plain)), [FiniteDifferenceOracle()], dtype="float64",
                         run=RunSettings(max_examples=4, case_dir=tmp_path / "cases",
                                         replay_target=plain.replay_arguments))
    failed = [r for r in records if r.status == "fail"]
    assert failed and "y" in {r.quantity for r in failed}
    case = load_case(failed[0].case_file)
    assert min(case.lengths) < case.x.shape[0]  # a row shorter than the sequence
    argv = shlex.split(failed[0].replay)
    assert argv[:2] == ["lstm-harness", "replay"] and "--structure" in argv
    capsys.readouterr()
    assert main([*argv[1:], "--in-process"]) == 1
    assert "fail" in capsys.readouterr().out


def test_a_fixed_structure_is_certified_in_the_programs_own_order_of_directions_and_states(tmp_path, capsys):
    cmd = shlex.join(_script("--reverse-first", "--direction-major"))
    own = ["--y-directions", "reverse-first", "--state-order", "direction-major"]
    assert main(["certify", "--command", cmd, "--structure", LAYER, *own, *FD, "--max-examples", "3", "--dtype",
                 "float64", "--in-process", "--report-dir", str(tmp_path / "a")]) == 0
    out = capsys.readouterr().out
    assert "Verdict: certified" in out
    # The note counts the cases of the features it computes, and names no other (a 0 there would read as unchecked).
    (note,) = [line for line in out.splitlines() if "by layer structure" in line]
    assert re.search(r"(\d+) cases by layer structure: \1 stacked, \1 bidirectional, \1 with lengths \(\d+ unsorted\)$",
                     note), note
    # Read in the contract's order, it is not: y and the final states depart on a case with both directions
    # (one case, checked directly: a failing certify of a program also shrinks and runs the convention search).
    plain = command(cmd, structure=LAYER)
    case = build_case(CaseSpec(dtype="float64", T=3, B=2, D=3, H=2, seed=2, num_layers=2, bidirectional=True,
                               lengths="random"))
    records = check_case(InProcessSubject(plain, validate(plain)), [FiniteDifferenceOracle()], case)
    assert {"y", "h_T", "c_T"} <= {r.quantity for r in records if r.status == "fail"}


def test_diagnose_names_the_options_of_a_programs_own_order_of_directions_and_states():
    from harness.diagnose import diagnose

    found = diagnose(command(_script("--reverse-first", "--direction-major"), structure="layers=2 bidirectional"))
    assert found.status == "none" and found.layer is not None and found.layer.complete
    assert found.layer.fix_keywords == {"state_order": "direction-major", "y_directions": "reverse-first"}
    # the options the fixed-structure test above certifies the program with
    assert ("or on the command line with the options --state-order direction-major --y-directions reverse-first"
            in found.text())


def test_with_structure_configures_a_copy_and_refuses_what_it_does_not_compute():
    impl = command(_script(), structures="layers,lengths")
    layered = impl.with_structure(Structure(num_layers=2, lengths=True))
    assert (layered.num_layers, layered.accepts_lengths) == (2, True) and impl.num_layers == 1
    assert layered.backward.__self__ is layered  # the backward of the copy sends the copy's structure
    again = pickle.loads(pickle.dumps(layered))
    assert again.structure == layered.structure and again.backward.__self__ is again
    with pytest.raises(ValueError, match=r"does not compute bidirectional \(it was given structures=layers,lengths"):
        impl.with_structure(Structure(bidirectional=True))
    assert impl.replay_arguments.endswith("--structures layers,lengths")
    fixed = command(_script(), structure=Structure(num_layers=2))
    assert not validate(fixed).configurable and validate(fixed).structure == Structure(num_layers=2)
    with pytest.raises(ValueError, match="computes layers=2 only .* not layers=5"):
        fixed.with_structure(Structure(num_layers=5))
    layernorm = command(_script(), variant="layernorm", structures="all")
    assert layernorm.structures == ("layers", "bidirectional", "lengths", "cifg")  # all it defines
    with pytest.raises(ValueError, match="proj_size: a projection is not defined for the layernorm variant"):
        command(_script(), variant="layernorm", structures="layers").with_structure(Structure(proj_size=2))


@pytest.mark.parametrize("kwargs, message", [
    ({"structure": "layers=0"}, "structure: layers=0: expected an int from 1 to 64, got 0"),
    ({"structure": "layers=20000"}, "structure: layers=20000: expected an int from 1 to 64, got 20000"),
    ({"structure": "layers=2 sideways"}, "structure: 'sideways': expected words among layers=L"),
    ({"structure": 2}, "structure: expected a harness.structure.Structure or its text"),
    ({"structures": "layers,sideways"}, "structures: expected structure features among"),
    ({"structures": ""}, "structures: expected structure features among .* got none"),
    ({"structure": "layers=2", "structures": "all"}, "give structure= .* or structures= .* not both"),
    ({"structures": "all", "gate_order": "ifco"}, r"gate_order: a program given structures= \(--structures\) is "
                                                  "certified in the contract's layout"),
    ({"structures": "proj,clip", "variant": "layernorm"}, "structures: the layernorm variant does not define proj, "
                                                         "clip"),
    ({"structure": "proj=2", "variant": "layernorm"}, r"structure: proj=2: a projection is not defined for the "
                                                     r"layernorm variant .*; leave out proj=2$"),
    ({"structure": "layers=2 clip=0.5", "variant": "layernorm"}, "structure: clip=0.5: clipping is not defined for "
                                                                 "the layernorm variant"),
    ({"structure": Structure(proj_size=2), "variant": "layernorm"}, "structure: proj_size: a projection is not "
                                                                    "defined .*; use proj_size=0$"),
    ({"structure": "layers=2", "gate_order": "ifco"}, "gate_order: not supported for a whole layer"),
])
def test_bad_structure_arguments_say_what_to_pass(kwargs, message):
    with pytest.raises(ValueError, match=message):
        command("true", **kwargs)


@pytest.mark.parametrize("argv, message", [
    (["certify", "--command", "true", "--structure", "layers=two"], "--structure: 'layers=two': expected layers=<int>"),
    (["certify", "--command", "true", "--variant", "layernorm", "--structure", "layers=2 proj=3"],
     "--structure: proj=3: a projection is not defined for the layernorm variant"),
    (["certify", "--command", "true", "--structures", "all,sideways"], "--structures: expected structure features"),
    (["certify", "loop", "--structure", "layers=2"], "--structure: applies to --command; a Python TARGET declares"),
    (["certify", "loop", "--structures", "all"], "--structures: applies to --command"),
    (["certify", "--command", "true", "--structures", "all", "--layout", "BTD"], "--layout: a program given "
                                                                                 "structures="),
    (["certify", "--command", "true", "--structure", "layers=2", "--structures", "all"], "not allowed with argument"),
    (["certify", "--command", "true", "--lengths", "packed"], "--structure '... lengths'"),
    (["certify", "--command", "true", "--state-order", "direction-major"], "--state-order: applies to a layered"),
    (["certify", "--command", "true", "--structure", "layers=2", "--gate-order", "ifco"],
     "--gate-order: not supported for a whole layer"),
    (["certify", "--command", "true", "--structures", "all", "--names", "W=w"],
     "--names: a program given structures= (--structures)"),
    (["run", "--impl", "loop", "--structure", "layers=2"], "--structure: in run, applies to the --command program"),
    (["run", "--impl", "loop", "--structures", "all"], "--structures: in run, applies to the --command program"),
])
def test_command_line_usage_errors(argv, message, capsys):
    with pytest.raises(SystemExit) if "not allowed" in message else _nothing():
        assert main(argv) == 2
    assert message in capsys.readouterr().err


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


# --------------------------------------------------------------------------------------------------
# The structure's words (--structure)


@pytest.mark.parametrize("structure", [
    Structure(),
    Structure(num_layers=3),
    Structure(num_layers=2, bidirectional=True, proj_size=3, coupled_input_forget=True, cell_clip=0.1 + 0.2,
              lengths=True),
    Structure(cell_clip=2.0),
])
def test_the_exact_words_of_a_structure_parse_back_to_it(structure):
    assert Structure.parse(structure.describe(exact=True)) == structure
    assert Structure.parse(structure.describe(exact=True).replace(" ", ",")) == structure


@pytest.mark.parametrize("text, message", [
    ("layers", "'layers': expected words among"),
    ("bidirectional=yes", "'bidirectional=yes': expected words among"),
    ("proj=1.5", "'proj=1.5': expected proj=<int>, got '1.5'"),
    ("clip=big", "'clip=big': expected clip=<float>"),
    ("clip=0", "clip=0.0: expected a positive finite float"),
    ("layers=2 layers=3", "'layers=3': layers is given twice"),
])
def test_words_that_are_not_a_structure_are_named(text, message):
    with pytest.raises(ValueError, match=message):
        Structure.parse(text)
