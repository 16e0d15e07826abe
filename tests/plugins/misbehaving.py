"""Implementations that raise, crash, hang, break the contract or keep state; each must get a clear verdict.

They are built on the readable reference (``impls.loop``) so that the only thing wrong with each is
the misbehaviour it is named for. Loaded by path in the tests: ``tests/plugins/misbehaving.py:Raises``.
"""

from __future__ import annotations

import ctypes
import os
import sys
import time

import numpy as np

from impls.loop import LoopLSTM
from oracles.finite_diff import FiniteDifferenceOracle


def _deep_helper(x):
    # A frame of the implementation's own, which the shortened traceback must keep.
    raise ValueError(f"cannot handle an input of shape {x.shape}")


class Correct(LoopLSTM):
    name = "correct"


class Raises(LoopLSTM):
    name = "raises"

    def forward(self, x, h0, c0, params):
        return _deep_helper(x)


class RaisesInBackward(LoopLSTM):
    name = "raises-in-backward"

    def backward(self, dy, dh_T, dc_T, cache):
        raise RuntimeError("backward is not written yet")


class ReturnsNaN(LoopLSTM):
    name = "returns-nan"

    def forward(self, x, h0, c0, params):
        y, h, c, cache = super().forward(x, h0, c0, params)
        y = y.copy()
        y[-1, 0, 0] = np.nan  # the last timestep, first batch row, first unit
        return y, h, c, cache


class WrongShape(LoopLSTM):
    name = "wrong-shape"

    def forward(self, x, h0, c0, params):
        y, h, c, cache = super().forward(x, h0, c0, params)
        return np.ascontiguousarray(y.transpose(1, 0, 2))[:, :, :, None], h, c, cache


class WrongDtype(LoopLSTM):
    name = "wrong-dtype"
    dtypes = ("float32",)

    def forward(self, x, h0, c0, params):
        y, h, c, cache = super().forward(x, h0, c0, params)
        return y.astype(np.float64), h, c, cache


class WrongCount(LoopLSTM):
    name = "wrong-count"

    def forward(self, x, h0, c0, params):
        y, h, c, cache = super().forward(x, h0, c0, params)
        return y, h, c


class NotArrays(LoopLSTM):
    name = "not-arrays"

    def forward(self, x, h0, c0, params):
        y, h, c, cache = super().forward(x, h0, c0, params)
        return y, "h_T", c, cache


class MissingGradient(LoopLSTM):
    name = "missing-gradient"

    def backward(self, dy, dh_T, dc_T, cache):
        grads = super().backward(dy, dh_T, dc_T, cache)
        del grads["c0"]
        return grads


class ExtraGradient(LoopLSTM):
    name = "extra-gradient"

    def backward(self, dy, dh_T, dc_T, cache):
        grads = super().backward(dy, dh_T, dc_T, cache)
        grads["bias"] = grads["b"]
        return grads


class GradientsAsList(LoopLSTM):
    name = "gradients-as-list"

    def backward(self, dy, dh_T, dc_T, cache):
        return list(super().backward(dy, dh_T, dc_T, cache).values())


class MutatesInput(LoopLSTM):
    name = "mutates-input"

    def forward(self, x, h0, c0, params):
        out = super().forward(x, h0, c0, params)
        x *= 0.5  # scales the caller's array in place after using it
        return out


class MutatesUpstream(LoopLSTM):
    name = "mutates-upstream"

    def backward(self, dy, dh_T, dc_T, cache):
        grads = super().backward(dy, dh_T, dc_T, cache)
        dy[...] = 0.0
        return grads


class Nondeterministic(LoopLSTM):
    name = "nondeterministic"

    def forward(self, x, h0, c0, params):
        y, h, c, cache = super().forward(x, h0, c0, params)
        noise = np.random.default_rng().standard_normal(y.shape).astype(y.dtype) * 1e-3
        return y + noise, h, c, cache


class Stateful(LoopLSTM):
    """Carries its last final state into the next call instead of starting from h0."""

    name = "stateful"

    def __init__(self):
        self.calls = 0

    def forward(self, x, h0, c0, params):
        self.calls += 1
        y, h, c, cache = super().forward(x, h0, c0, params)
        return y, h + 1e-3 * self.calls, c, cache


class Hangs(LoopLSTM):
    name = "hangs"

    def forward(self, x, h0, c0, params):
        while True:
            time.sleep(0.05)


class HangsInBackward(LoopLSTM):
    name = "hangs-in-backward"

    def backward(self, dy, dh_T, dc_T, cache):
        time.sleep(3600)


class Segfaults(LoopLSTM):
    name = "segfaults"

    def forward(self, x, h0, c0, params):
        return ctypes.string_at(0)  # reads address 0: SIGSEGV


class SegfaultsInBackward(LoopLSTM):
    name = "segfaults-in-backward"

    def backward(self, dy, dh_T, dc_T, cache):
        return ctypes.string_at(0)


class Exits(LoopLSTM):
    name = "exits"

    def forward(self, x, h0, c0, params):
        os._exit(3)


class CallsSysExit(LoopLSTM):
    name = "calls-sys-exit"

    def forward(self, x, h0, c0, params):
        sys.exit("giving up")


class ExhaustsMemory(LoopLSTM):
    """Reserves 256 MiB blocks until the allocation fails (np.empty does not touch the pages)."""

    name = "exhausts-memory"

    def forward(self, x, h0, c0, params):
        hoard = []
        while True:
            hoard.append(np.empty(2**25))


class NoForward:
    variant = "vanilla"

    def backward(self, dy, dh_T, dc_T, cache):
        return {}


class NeedsArguments(LoopLSTM):
    def __init__(self, hidden_size):
        self.hidden_size = hidden_size


def forward_function(x, h0, c0, params):
    return LoopLSTM().forward(x, h0, c0, params)


def make_correct():
    return Correct()


class UnknownVariant(LoopLSTM):
    variant = "gru"


correct_instance = Correct()


class CrashesOnLongSequences(LoopLSTM):
    """Correct for T < 6; a segmentation fault for longer sequences."""

    name = "crashes-on-long-sequences"

    def forward(self, x, h0, c0, params):
        if x.shape[0] >= 6:
            ctypes.string_at(0)
        return super().forward(x, h0, c0, params)


class HangsOnLongSequences(LoopLSTM):
    """Correct for T < 6; never returns for longer sequences."""

    name = "hangs-on-long-sequences"

    def forward(self, x, h0, c0, params):
        if x.shape[0] >= 6:
            time.sleep(3600)
        return super().forward(x, h0, c0, params)


class WrongSignature:
    variant = "vanilla"

    def forward(self, x):
        return x


class ExitsInBackward(LoopLSTM):
    name = "exits-in-backward"

    def backward(self, dy, dh_T, dc_T, cache):
        os._exit(3)


class InterruptsInBackward(LoopLSTM):
    """Raises what ``execute`` deliberately lets through (so that a person can stop a run)."""

    name = "interrupts-in-backward"

    def backward(self, dy, dh_T, dc_T, cache):
        raise KeyboardInterrupt("backward interrupted itself")


class TaggedArray(np.ndarray):
    """An ndarray subclass of the plugin's own: a parent process that never imported this file cannot
    unpickle it."""


class SubclassOutputs(LoopLSTM):
    name = "subclass-outputs"

    def forward(self, x, h0, c0, params):
        y, h, c, cache = super().forward(x, h0, c0, params)
        return y.view(TaggedArray), h.view(TaggedArray), c.view(TaggedArray), cache


class Prints(LoopLSTM):
    name = "prints"

    def forward(self, x, h0, c0, params):
        print("debug output of the implementation", flush=True)
        return super().forward(x, h0, c0, params)


class SpawnsAndHangs(LoopLSTM):
    """Starts a process of its own (its pid written to $LSTM_HARNESS_TEST_PIDFILE), then hangs."""

    name = "spawns-and-hangs"

    def forward(self, x, h0, c0, params):
        import subprocess

        child = subprocess.Popen(["sleep", "300"])
        with open(os.environ["LSTM_HARNESS_TEST_PIDFILE"], "w") as fh:
            fh.write(str(child.pid))
        time.sleep(3600)


class BugAndCrash(LoopLSTM):
    """dW is 1.5 times too large on every case, and forward segfaults for T >= 6: the discrepancy found
    first must survive the crash found later."""

    name = "bug-and-crash"

    def forward(self, x, h0, c0, params):
        if x.shape[0] >= 6:
            ctypes.string_at(0)
        return super().forward(x, h0, c0, params)

    def backward(self, dy, dh_T, dc_T, cache):
        grads = super().backward(dy, dh_T, dc_T, cache)
        grads["W"] = grads["W"] * 1.5
        return grads


def _die_when_unpickled():
    os._exit(7)


class DiesInChildOracle(FiniteDifferenceOracle):
    """An oracle that pickles fine here and kills the process that unpickles it (a parallel child)."""

    name = "dies-in-child"

    def __reduce__(self):
        return (_die_when_unpickled, ())


class HangsWhileLoading(LoopLSTM):
    """Never finishes being constructed: the worker is stuck loading it."""

    name = "hangs-while-loading"

    def __init__(self):
        time.sleep(3600)


# What a terminal would obey: clear the screen, retitle the window, return to the line start, and a
# verdict in green that the harness never gave.
TERMINAL_TRICKS = "\x1b[2J\x1b[H\x1b]0;pwned\x07\rVerdict: \x1b[32mcertified\x1b[0m"


class DrivesTheTerminal(LoopLSTM):
    """Prints terminal control sequences, then raises with them in the message."""

    name = "drives-the-terminal"

    def forward(self, x, h0, c0, params):
        print(TERMINAL_TRICKS, flush=True)
        raise ValueError(TERMINAL_TRICKS)


class RaisesHugeMessage(LoopLSTM):
    """Raises a ValueError whose message is 20 MiB long."""

    name = "raises-huge-message"

    def forward(self, x, h0, c0, params):
        raise ValueError("start of the message " + "x" * (20 * 2**20) + " end of the message")


class ReturnsHugeGradient(LoopLSTM):
    """Adds a 48 MiB gradient nobody asked for: a reply far over what the case calls for."""

    name = "returns-huge-gradient"

    def backward(self, dy, dh_T, dc_T, cache):
        grads = super().backward(dy, dh_T, dc_T, cache)
        grads["huge"] = np.ones(6 * 2**20)
        return grads


class MutatesInputAndHidesIt(LoopLSTM):
    """Halves x in place after using it, having first switched off the mutation check of the process
    it runs in."""

    name = "mutates-input-and-hides-it"

    def forward(self, x, h0, c0, params):
        import harness.subject

        harness.subject._mutations = lambda *args, **kwargs: []
        out = super().forward(x, h0, c0, params)
        x *= 0.5
        return out


class FakesProgressAndHangs(LoopLSTM):
    """Writes "backward has started" messages, in the format of the worker's replies, on the worker's own
    socket (its file descriptor is the worker's first argument) every 0.2 s, and never returns."""

    name = "fakes-progress-and-hangs"

    def forward(self, x, h0, c0, params):
        from multiprocessing.connection import Connection

        from harness.replies import dumps

        conn = Connection(os.dup(int(sys.argv[1])))
        while True:
            conn.send_bytes(dumps(["phase", "backward", None]))
            time.sleep(0.2)


class SpawnsInItsOwnSessionAndHangs(LoopLSTM):
    """Starts a process in a session of its own (out of the worker's process group; its pid written to
    $LSTM_HARNESS_TEST_PIDFILE), then hangs."""

    name = "spawns-in-its-own-session-and-hangs"

    def forward(self, x, h0, c0, params):
        import subprocess

        child = subprocess.Popen(["sleep", "300"], start_new_session=True)
        with open(os.environ["LSTM_HARNESS_TEST_PIDFILE"], "w") as fh:
            fh.write(str(child.pid))
        time.sleep(3600)


class SpawnsAndReturns(LoopLSTM):
    """Starts a process in a session of its own, through a parent that exits at once (a daemon), and
    returns normally; the pid of the process left running is written to $LSTM_HARNESS_TEST_PIDFILE."""

    name = "spawns-and-returns"

    def forward(self, x, h0, c0, params):
        import subprocess

        path = os.environ["LSTM_HARNESS_TEST_PIDFILE"]
        if not os.path.exists(path):
            subprocess.run(["sh", "-c", f"setsid sleep 300 & echo $! > {path}"], check=True)
        return super().forward(x, h0, c0, params)


class SignalsItsParent(LoopLSTM):
    """Sends $LSTM_HARNESS_TEST_SIGNAL (default SIGTERM) to its parent process, then waits."""

    name = "signals-its-parent"

    def forward(self, x, h0, c0, params):
        import signal

        os.kill(os.getppid(), getattr(signal, os.environ.get("LSTM_HARNESS_TEST_SIGNAL", "SIGTERM")))
        time.sleep(30)
        return super().forward(x, h0, c0, params)
