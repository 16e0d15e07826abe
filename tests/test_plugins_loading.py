"""Loading TARGET: every form, and a message that says what to fix for every way it can go wrong."""

from __future__ import annotations

from pathlib import Path

import pytest

from harness.cli import main
from harness.contract import ContractError
from harness.plugins import LoadError, entry_points, load_implementation, load_target, parse_target

PLUGINS = Path(__file__).parent / "plugins"
MISBEHAVING = PLUGINS / "misbehaving.py"


def test_parse_target_forms():
    assert parse_target("impls.loop:LoopLSTM").kind == "module"
    t = parse_target(f"{MISBEHAVING}:Correct")
    assert (t.kind, t.location, t.attribute) == ("file", str(MISBEHAVING.resolve()), "Correct")
    assert parse_target("tests/plugins/misbehaving.py:Correct").kind == "file"
    ep = parse_target("loop")
    assert ep.kind == "entry point" and ep.location == entry_points()["loop"]


@pytest.mark.parametrize("attribute, expected_name", [
    ("Correct", "correct"),            # a class, created with no arguments
    ("correct_instance", "correct"),   # an object
    ("make_correct", "correct"),       # a zero-argument factory
])
def test_attribute_kinds(attribute, expected_name):
    obj, info, target = load_implementation(f"{MISBEHAVING}:{attribute}")
    assert info.name == expected_name
    assert callable(obj.forward)
    assert target.attribute == attribute


def test_module_and_entry_point_targets():
    obj, info, _ = load_implementation("impls.loop:LoopLSTM")
    assert info.name == "loop"
    obj2, info2, target = load_implementation("loop")
    assert type(obj2) is type(obj) and target.kind == "entry point"


def test_variant_override():
    _, info, _ = load_implementation("loop", variant="vanilla")
    assert info.variant == "vanilla"


def _message(exc_info) -> str:
    return str(exc_info.value)


def test_nonexistent_module():
    with pytest.raises(LoadError) as exc:
        load_target("no_such_package_xyz.lstm:MyLSTM")
    text = _message(exc)
    assert "no module named 'no_such_package_xyz'" in text
    assert "install" in text and "current directory" in text


def test_syntax_error_file(tmp_path):
    bad = tmp_path / "broken_syntax.py"
    bad.write_text("class MyLSTM:\n    def forward(self, x, h0, c0, params)\n        return x\n")
    with pytest.raises(LoadError) as exc:
        load_target(f"{bad}:MyLSTM")
    text = _message(exc)
    assert "syntax error" in text and "line 2" in text and "Fix the syntax error" in text


def test_missing_attribute_lists_what_the_module_defines():
    with pytest.raises(LoadError) as exc:
        load_target(f"{MISBEHAVING}:NoSuchLSTM")
    text = _message(exc)
    assert "has no attribute 'NoSuchLSTM'" in text
    assert "Correct" in text and "It defines" in text


def test_a_missing_attribute_lists_the_adapters_a_file_makes(tmp_path):
    """An adapter made in the file is of the harness's class: it is still one of the file's implementations."""
    path = tmp_path / "adapters.py"
    path.write_text("import numpy as np\nfrom harness import adapt\nfrom impls.loop import LoopLSTM\n"
                    "NAMES = {'W': 'Wx'}\ngood = adapt(LoopLSTM(), names=NAMES)\n")
    with pytest.raises(LoadError) as exc:
        load_target(f"{path}:goood")
    assert _message(exc).endswith("It defines: good.")
    path.write_text("import numpy as np\nNAMES = {'W': 'Wx'}\n")
    with pytest.raises(LoadError) as exc:
        load_target(f"{path}:goood")
    assert _message(exc).endswith("It defines no implementation, class or function of its own.")


def test_object_without_forward():
    with pytest.raises(ContractError) as exc:
        load_implementation(f"{MISBEHAVING}:NoForward")
    assert "forward: missing; expected a method forward(x, h0, c0, params)" in _message(exc)


def test_class_needing_arguments():
    with pytest.raises(LoadError) as exc:
        load_target(f"{MISBEHAVING}:NeedsArguments")
    assert "needs arguments (hidden_size)" in _message(exc)


def test_forward_function_points_to_adapt():
    with pytest.raises(LoadError) as exc:
        load_target(f"{MISBEHAVING}:forward_function")
    assert "harness.adapt(forward_fn=forward_function" in _message(exc)


def test_missing_file_and_missing_attribute_part(tmp_path):
    with pytest.raises(LoadError) as exc:
        load_target(f"{tmp_path}/nope.py:MyLSTM")
    assert "does not exist" in _message(exc)
    with pytest.raises(LoadError) as exc:
        parse_target("tests/plugins/misbehaving.py")
    assert "misbehaving.py:NAME" in _message(exc)
    with pytest.raises(LoadError) as exc:
        parse_target("certainly_not_registered")
    assert "registered: " in _message(exc) and "loop" in _message(exc)


def test_error_while_importing_keeps_the_users_traceback(tmp_path):
    bad = tmp_path / "raises_at_import.py"
    bad.write_text("def helper():\n    raise RuntimeError('no GPU here')\n\nhelper()\n")
    with pytest.raises(LoadError) as exc:
        load_target(f"{bad}:X")
    text = _message(exc)
    assert "RuntimeError: no GPU here" in text and "raises_at_import.py" in text and "helper" in text


@pytest.mark.parametrize("target, expected", [
    ("no_such_package_xyz.lstm:MyLSTM", "no module named 'no_such_package_xyz'"),
    (f"{MISBEHAVING}:NoSuchLSTM", "has no attribute 'NoSuchLSTM'"),
    (f"{MISBEHAVING}:NoForward", "forward: missing"),
    (f"{MISBEHAVING}:UnknownVariant", "variant: expected one of ['layernorm', 'peephole', 'vanilla'], got 'gru'"),
    (f"{MISBEHAVING}:WrongSignature", "forward: expected forward(x, h0, c0, params), but it takes (x)"),
])
def test_cli_exit_2_in_process(target, expected, capsys, tmp_path):
    code = main(["certify", target, "--in-process", "--report-dir", str(tmp_path / "report")])
    err = capsys.readouterr().err
    assert code == 2
    assert expected in err and err.startswith("lstm-harness certify: error:")
    assert not (tmp_path / "report.json").exists()


def test_cli_exit_2_from_the_worker(capsys, tmp_path):
    """The same errors, found by the worker process that loads the target in an isolated run."""
    bad = tmp_path / "broken_syntax.py"
    bad.write_text("def forward(:\n")
    assert main(["certify", f"{bad}:MyLSTM", "--report-dir", str(tmp_path / "report")]) == 2
    assert "syntax error" in capsys.readouterr().err
    assert main(["certify", f"{MISBEHAVING}:NoForward", "--report-dir", str(tmp_path / "report")]) == 2
    assert "forward: missing" in capsys.readouterr().err


def test_cli_exit_2_when_the_module_kills_the_worker_while_loading(capsys, tmp_path):
    bad = tmp_path / "exits_at_import.py"
    bad.write_text("import os\nos._exit(7)\n")
    assert main(["certify", f"{bad}:X", "--report-dir", str(tmp_path / "report")]) == 2
    assert "died while loading" in capsys.readouterr().err


def test_an_exception_class_of_the_users_own_at_import_is_a_failure_to_load(tmp_path):
    """Outside Exception's tree too: loading in process must not end the run with a traceback."""
    path = tmp_path / "aborts.py"
    path.write_text("class Abort(BaseException):\n    pass\n\nraise Abort('not today')\n")
    with pytest.raises(LoadError, match=r"running file .*aborts.py raised Abort: not today"):
        load_target(f"{path}:LSTM")
