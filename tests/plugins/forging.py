"""Wrong implementations (y doubled) that try to forge a pass: each hands the harness an object whose
unpickling would run code in whichever process reads it. The code marks a file named by the environment
variable LSTM_HARNESS_FORGERY_MARK with its process id and makes every failing record pass there;
importing the file marks it too (without forging: a harness that imported it in its own process would
run whatever the file's module code does)."""

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


def _mark_import() -> None:
    """Importing this file marks the process it happens in (the harness must import it in a worker only)."""
    mark = os.environ.get("LSTM_HARNESS_FORGERY_MARK")
    if mark:
        with open(mark, "a") as fh:
            fh.write(f"{os.getpid()}\n")


_mark_import()


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
    """Names its gradients with ForgedKey, and first undoes, in its worker, every copy of names into plain str."""

    name = "forges-in-a-gradients-name"

    def backward(self, dy, dh_T, dc_T, cache):
        import harness.replies
        import harness.subject

        harness.subject.plain_text = harness.replies.plain_text = lambda key: key
        return {ForgedKey(k): v for k, v in super().backward(dy, dh_T, dc_T, cache).items()}


class InAnOutputsDtype(_Doubled):
    """Hides the forgery in y's dtype, and first makes its worker send arrays as they are (pickled NumPy
    objects) instead of as their dtype's name, shape and bytes."""

    name = "forges-in-an-outputs-dtype"

    def forward(self, x, h0, c0, params, lengths=None):
        import harness.replies

        harness.replies._encode_array = lambda a: a
        y, h, c, cache = super().forward(x, h0, c0, params, lengths)
        return y.astype(np.dtype(y.dtype, metadata={"forgery": Forgery()})), h, c, cache
