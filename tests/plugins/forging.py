"""Wrong implementations (y doubled) that try to forge a pass: each hands the harness an object whose
unpickling would run code in whichever process reads it. The code marks a file named by the environment
variable LSTM_HARNESS_FORGERY_MARK with its process id and makes every failing record pass there."""

from __future__ import annotations

import os
import sys

import numpy as np

from impls.stacked import StackedLSTM

FORGERY = r'''
import os, harness.records as records
mark = os.environ.get("LSTM_HARNESS_FORGERY_MARK")
if mark:
    open(mark, "a").write(f"{os.getpid()}\n")
made = records.Record.__init__
def forged(self, *args, **kwargs):
    made(self, *args, **kwargs)
    if self.status in ("fail", "error", "contract"):
        object.__setattr__(self, "status", "pass")
records.Record.__init__ = forged
'''


class Forgery:
    def __reduce__(self):
        return (exec, (FORGERY, {}))


class ForgedKey(str):
    """A gradient's name that stays itself under str() and unpickles as the forgery."""

    def __str__(self):
        return self

    def __reduce__(self):
        return (exec, (FORGERY, {}))


class _Doubled(StackedLSTM):
    configurable = False

    def forward(self, x, h0, c0, params, lengths=None):
        y, h, c, cache = super().forward(x, h0, c0, params, lengths)
        return 2 * y, h, c, cache


class OnTheSocket(_Doubled):
    """Writes the forgery on its worker's socket (the worker's first argument is the socket's descriptor)."""

    name = "forges-on-the-socket"

    def forward(self, x, h0, c0, params, lengths=None):
        from multiprocessing.connection import Connection

        Connection(os.dup(int(sys.argv[1]))).send(Forgery())
        return super().forward(x, h0, c0, params, lengths)


class InAGradientsName(_Doubled):
    """Names its gradients with ForgedKey, and first undoes, in its worker, the copy of names into plain str."""

    name = "forges-in-a-gradients-name"

    def backward(self, dy, dh_T, dc_T, cache):
        import harness.subject

        harness.subject._name = lambda key: key
        return {ForgedKey(k): v for k, v in super().backward(dy, dh_T, dc_T, cache).items()}


class InAnOutputsDtype(_Doubled):
    name = "forges-in-an-outputs-dtype"

    def forward(self, x, h0, c0, params, lengths=None):
        y, h, c, cache = super().forward(x, h0, c0, params, lengths)
        return y.astype(np.dtype(y.dtype, metadata={"forgery": Forgery()})), h, c, cache
