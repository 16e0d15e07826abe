"""Implementations that try to end the run or take too long, for the signal and in-process tests."""

from __future__ import annotations

import os
import time

from impls.loop import LoopLSTM


class SlowInFloat32(LoopLSTM):
    """Correct; every float32 call sleeps, so that a run can be interrupted while its float32 unit runs."""

    name = "slow-in-float32"

    def forward(self, x, h0, c0, params):
        if x.dtype.name == "float32":
            time.sleep(0.5)
        return super().forward(x, h0, c0, params)


class ExitsZeroOnThirdCall(LoopLSTM):
    """Calls os._exit(0) on its third forward: in process, that would end the run with exit code 0."""

    name = "exits-zero-on-third-call"
    calls = 0

    def forward(self, x, h0, c0, params):
        type(self).calls += 1
        if type(self).calls == 3:
            os._exit(0)
        return super().forward(x, h0, c0, params)


class Abort(BaseException):
    """An implementation's own exception class outside Exception's tree."""


class RaisesItsOwnBaseException(LoopLSTM):
    """Its backward raises Abort, which ``except Exception`` would let through."""

    name = "raises-its-own-base-exception"

    def backward(self, dy, dh_T, dc_T, cache):
        raise Abort("gave up")
