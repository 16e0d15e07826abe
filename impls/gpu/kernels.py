"""The fused kernels of each variant, forward and backward, as statement tables."""

from __future__ import annotations

from impls.gpu.language import Kernel, Let, Load, Phase, Row, Store, Sum

__all__ = ["KERNELS"]

# Buffers and their index formulas. Per-step views (a = gates[t], da = da[t], c_prev, c, h, dh, dc,
# dy_t, rec) are indexed from their own start; whole (T, ...) buffers of the cell (tanh_c, the
# LayerNorm statistics, dz) are passed whole with the step t. Gates are in the internal order
# i, f, o, g (impls.stacked), so gate k of a (B, 4H) block is columns k*H .. k*H + H - 1.

IFOG = ("i", "f", "o", "g")
BH = "b * H + j"  # a (B, H) view
STEP_BH = "t * B * H + b * H + j"  # step t of a (T, B, H) buffer
UNIT = "j"  # an (H,) parameter


def _gate(k: int) -> str:  # gate k of a (B, 4H) view
    return f"b * 4 * H + {k} * H + j"


def _step_gate(k: int) -> str:  # gate k at step t of a (T, B, 4H) buffer
    return f"t * B * 4 * H + b * 4 * H + {k} * H + j"


def _ln_row(k: int) -> str:  # row k of a (5, H) gain or shift, internal order i, f, o, g, c
    return f"{k} * H + j"


def _gate_loads(prefix: str, buf: str, fmt=_gate, gates=IFOG) -> tuple[Load, ...]:
    return tuple(Load(f"{prefix}{g}", buf, fmt(IFOG.index(g))) for g in gates)


#: How every backward kernel starts: the upstream gradients dy_t, dh (from step t+1) and dc.
_UPSTREAM_LOADS = (Load("dy", "dy", BH), Load("dh", "dh", BH), Load("dc", "dc", BH))
#: The peephole weights, one per unit.
_PEEPHOLE_LOADS = (Load("p_i", "p_i", UNIT), Load("p_f", "p_f", UNIT), Load("p_o", "p_o", UNIT))

#: How the vanilla and peephole forward kernels end: the activations i, f, o, g replace the
#: pre-activations in a (the backward reads them there); c_t, tanh(c_t) and h_t are written.
_STATE_STORES = (
    *(Store("a", _gate(k), g) for k, g in enumerate(IFOG)),
    Store("c", BH, "c_t"),
    Store("tanh_c", STEP_BH, "tanh_c_t"),
    Store("h", BH, "o * tanh_c_t"),
)

VANILLA_FORWARD = Kernel(
    "lstm_vanilla_forward",
    arrays=(("a", "out"), ("rec", "in"), ("c_prev", "in"), ("c", "out"), ("h", "out"), ("tanh_c", "out")),
    steps=(Phase((
        *_gate_loads("a_", "a"),
        *_gate_loads("r_", "rec"),
        Load("c_prev", "c_prev", BH),
        Let("i", "sigmoid(a_i + r_i)"),
        Let("f", "sigmoid(a_f + r_f)"),
        Let("o", "sigmoid(a_o + r_o)"),
        Let("g", "tanh(a_g + r_g)"),
        Let("c_t", "f * c_prev + i * g"),
        Let("tanh_c_t", "tanh(c_t)"),
        *_STATE_STORES,
    )),),
)

VANILLA_BACKWARD = Kernel(
    "lstm_vanilla_backward",
    arrays=(("dy", "in"), ("dh", "in"), ("dc", "out"), ("da", "out"), ("a", "in"), ("c_prev", "in"),
            ("tanh_c", "in")),
    steps=(Phase((
        *_UPSTREAM_LOADS,
        Load("c_prev", "c_prev", BH),
        Load("tc", "tanh_c", STEP_BH),
        *_gate_loads("", "a"),
        Let("dh_all", "dh + dy"),
        Let("dc_t", "dc + (1 - tc * tc) * o * dh_all"),  # c_t is reached directly and through h_t
        Store("da", _gate(0), "dc_t * g * i * (1 - i)"),
        Store("da", _gate(1), "dc_t * c_prev * f * (1 - f)"),
        Store("da", _gate(2), "dh_all * tc * o * (1 - o)"),
        Store("da", _gate(3), "dc_t * i * (1 - g * g)"),
        Store("dc", BH, "dc_t * f"),  # dL/dc_{t-1}
    )),),
)

PEEPHOLE_FORWARD = Kernel(
    "lstm_peephole_forward",
    arrays=(("a", "out"), ("rec", "in"), ("c_prev", "in"), ("c", "out"), ("h", "out"), ("tanh_c", "out"),
            ("p_i", "in"), ("p_f", "in"), ("p_o", "in")),
    steps=(Phase((
        *_gate_loads("a_", "a"),
        *_gate_loads("r_", "rec"),
        Load("c_prev", "c_prev", BH),
        *_PEEPHOLE_LOADS,
        Let("i", "sigmoid(a_i + r_i + c_prev * p_i)"),  # i and f see c_{t-1}
        Let("f", "sigmoid(a_f + r_f + c_prev * p_f)"),
        Let("g", "tanh(a_g + r_g)"),
        Let("c_t", "f * c_prev + i * g"),
        Let("o", "sigmoid(a_o + r_o + c_t * p_o)"),  # o sees c_t
        Let("tanh_c_t", "tanh(c_t)"),
        *_STATE_STORES,
    )),),
)

PEEPHOLE_BACKWARD = Kernel(
    "lstm_peephole_backward",
    arrays=(("dy", "in"), ("dh", "in"), ("dc", "out"), ("da", "out"), ("a", "in"), ("c_prev", "in"),
            ("tanh_c", "in"), ("p_i", "in"), ("p_f", "in"), ("p_o", "in")),
    steps=(Phase((
        *_UPSTREAM_LOADS,
        Load("c_prev", "c_prev", BH),
        Load("tc", "tanh_c", STEP_BH),
        *_PEEPHOLE_LOADS,
        *_gate_loads("", "a"),
        Let("dh_all", "dh + dy"),
        Let("da_o", "dh_all * tc * o * (1 - o)"),
        # c_t is reached directly, through h_t and through the output gate's peephole
        Let("dc_t", "dc + (1 - tc * tc) * o * dh_all + da_o * p_o"),
        Let("da_i", "dc_t * g * i * (1 - i)"),
        Let("da_f", "dc_t * c_prev * f * (1 - f)"),
        Store("da", _gate(0), "da_i"),
        Store("da", _gate(1), "da_f"),
        Store("da", _gate(2), "da_o"),
        Store("da", _gate(3), "dc_t * ((1 - g * g) * i)"),
        Store("dc", BH, "dc_t * f + da_i * p_i + da_f * p_f"),  # dL/dc_{t-1}, peepholes included
    )),),
)

# LayerNorm: the four gate rows of a step are normalized separately, then the new cell state. Two-pass
# statistics as in the NumPy cell (mean first, then the mean of squared deviations), so each phase
# that needs a statistic starts after the reduction that makes it. The normalized rows n, n_c and
# r = 1 / sqrt(var + eps) are kept (T-long buffers) for the backward and the gain/shift gradients.
_LN_FORWARD_ARRAYS = (("a", "out"), ("rec", "in"), ("c_prev", "in"), ("c", "out"), ("h", "out"),
                      ("gamma", "in"), ("beta", "in"), ("n", "out"), ("r", "out"), ("n_c", "out"),
                      ("r_c", "out"), ("tanh_c", "out"))

LAYERNORM_FORWARD = Kernel(
    "lstm_layernorm_forward",
    arrays=_LN_FORWARD_ARRAYS,
    scalars=("eps",),
    steps=(
        Phase((  # v_k = a_k + rec_k, kept in a; the four row sums
            *_gate_loads("a_", "a"),
            *_gate_loads("r_", "rec"),
            *(Let(f"v_{g}", f"a_{g} + r_{g}") for g in IFOG),
            *(Store("a", _gate(k), f"v_{g}") for k, g in enumerate(IFOG)),
            *(Sum(f"sum_{g}", f"v_{g}") for g in IFOG),
        )),
        Row(tuple(Let(f"mean_{g}", f"sum_{g} / H") for g in IFOG)),
        Phase((  # the squared deviations
            *_gate_loads("v_", "a"),
            *(Let(f"d_{g}", f"v_{g} - mean_{g}") for g in IFOG),
            *(Sum(f"sq_{g}", f"d_{g} * d_{g}") for g in IFOG),
        )),
        Row((
            *(Let(f"r_{g}", f"1 / sqrt(sq_{g} / H + eps)") for g in IFOG),  # biased variance, eps inside
            *(Store("r", f"t * B * 4 + b * 4 + {k}", f"r_{g}") for k, g in enumerate(IFOG)),
        )),
        Phase((  # normalize, gain and shift, the gates, s_t = f * c_{t-1} + i * g (kept in c)
            *_gate_loads("v_", "a"),
            *(Let(f"n_{g}", f"(v_{g} - mean_{g}) * r_{g}") for g in IFOG),
            *(Store("n", _step_gate(k), f"n_{g}") for k, g in enumerate(IFOG)),
            *(Load(f"gamma_{g}", "gamma", _ln_row(k)) for k, g in enumerate(IFOG)),
            *(Load(f"beta_{g}", "beta", _ln_row(k)) for k, g in enumerate(IFOG)),
            Let("i", "sigmoid(n_i * gamma_i + beta_i)"),
            Let("f", "sigmoid(n_f * gamma_f + beta_f)"),
            Let("o", "sigmoid(n_o * gamma_o + beta_o)"),
            Let("g", "tanh(n_g * gamma_g + beta_g)"),
            *(Store("a", _gate(k), g) for k, g in enumerate(IFOG)),
            Load("c_prev", "c_prev", BH),
            Let("s", "f * c_prev + i * g"),
            Store("c", BH, "s"),
            Sum("sum_c", "s"),
        )),
        Row((Let("mean_c", "sum_c / H"),)),
        Phase((
            Load("s", "c", BH),
            Let("d", "s - mean_c"),
            Sum("sq_c", "d * d"),
        )),
        Row((
            Let("r_cell", "1 / sqrt(sq_c / H + eps)"),
            Store("r_c", "t * B + b", "r_cell"),
        )),
        Phase((  # c_t = LN_c(s_t), h_t = o * tanh(c_t)
            Load("s", "c", BH),
            Let("n_cell", "(s - mean_c) * r_cell"),
            Store("n_c", STEP_BH, "n_cell"),
            Load("gamma_c", "gamma", _ln_row(4)),
            Load("beta_c", "beta", _ln_row(4)),
            Let("c_t", "n_cell * gamma_c + beta_c"),
            Store("c", BH, "c_t"),
            Let("tanh_c_t", "tanh(c_t)"),
            Store("tanh_c", STEP_BH, "tanh_c_t"),
            Load("o", "a", _gate(2)),
            Store("h", BH, "o * tanh_c_t"),
        )),
    ),
)

# Backward through a layer norm z = n * gamma + beta: dn = dz * gamma,
# dv = r * (dn - mean(dn) - n * mean(dn * n)), the two means per row being the phases' sums.
LAYERNORM_BACKWARD = Kernel(
    "lstm_layernorm_backward",
    arrays=(("dy", "in"), ("dh", "in"), ("dc", "out"), ("da", "out"), ("a", "in"), ("c_prev", "in"),
            ("tanh_c", "in"), ("n", "in"), ("r", "in"), ("n_c", "in"), ("r_c", "in"), ("gamma", "in"),
            ("dz", "out"), ("dz_c", "out")),
    steps=(
        Phase((  # dz_o, dz_c = dL/dc_t, and the sums for LN_c's backward
            *_UPSTREAM_LOADS,
            Load("tc", "tanh_c", STEP_BH),
            Load("o", "a", _gate(2)),
            Let("dh_all", "dh + dy"),
            Store("dz", _step_gate(2), "dh_all * tc * o * (1 - o)"),
            Let("dz_cell", "dc + (1 - tc * tc) * o * dh_all"),  # c_t is reached directly and through h_t
            Store("dz_c", STEP_BH, "dz_cell"),
            Load("n_cell", "n_c", STEP_BH),
            Load("gamma_c", "gamma", _ln_row(4)),
            Let("dn", "dz_cell * gamma_c"),
            Sum("s1_c", "dn"),
            Sum("s2_c", "dn * n_cell"),
        )),
        Row((
            Let("m1_c", "s1_c / H"),
            Let("m2_c", "s2_c / H"),
            Load("r_cell", "r_c", "t * B + b"),
        )),
        Phase((  # ds = LN_c backward; dz_i, dz_f, dz_g; dc_{t-1}; the sums for the gates' backward
            Load("dz_cell", "dz_c", STEP_BH),
            Load("n_cell", "n_c", STEP_BH),
            Load("gamma_c", "gamma", _ln_row(4)),
            Let("dn", "dz_cell * gamma_c"),
            Let("ds", "r_cell * (dn - m1_c - n_cell * m2_c)"),
            *_gate_loads("", "a", gates=("i", "f", "g")),
            Load("c_prev", "c_prev", BH),
            Let("dz_i", "ds * g * i * (1 - i)"),
            Let("dz_f", "ds * c_prev * f * (1 - f)"),
            Let("dz_g", "ds * ((1 - g * g) * i)"),
            Load("dz_o", "dz", _step_gate(2)),  # this thread stored it in the phase before
            Store("dz", _step_gate(0), "dz_i"),
            Store("dz", _step_gate(1), "dz_f"),
            Store("dz", _step_gate(3), "dz_g"),
            Store("dc", BH, "ds * f"),  # dL/dc_{t-1}
            *(Load(f"n_{g}", "n", _step_gate(k)) for k, g in enumerate(IFOG)),
            *(Load(f"gamma_{g}", "gamma", _ln_row(k)) for k, g in enumerate(IFOG)),
            *(Let(f"dn_{g}", f"dz_{g} * gamma_{g}") for g in IFOG),
            *(Sum(f"s1_{g}", f"dn_{g}") for g in IFOG),
            *(Sum(f"s2_{g}", f"dn_{g} * n_{g}") for g in IFOG),
        )),
        Row((
            *(Let(f"m1_{g}", f"s1_{g} / H") for g in IFOG),
            *(Let(f"m2_{g}", f"s2_{g} / H") for g in IFOG),
            *(Load(f"r_{g}", "r", f"t * B * 4 + b * 4 + {k}") for k, g in enumerate(IFOG)),
        )),
        Phase((  # da_k = LN_k backward of dz_k
            *(Load(f"dz_{g}", "dz", _step_gate(k)) for k, g in enumerate(IFOG)),
            *(Load(f"n_{g}", "n", _step_gate(k)) for k, g in enumerate(IFOG)),
            *(Load(f"gamma_{g}", "gamma", _ln_row(k)) for k, g in enumerate(IFOG)),
            *(Let(f"dn_{g}", f"dz_{g} * gamma_{g}") for g in IFOG),
            *(Store("da", _gate(k), f"r_{g} * (dn_{g} - m1_{g} - n_{g} * m2_{g})") for k, g in enumerate(IFOG)),
        )),
    ),
)

#: Every kernel, by variant: (forward, backward).
KERNELS: dict[str, tuple[Kernel, Kernel]] = {
    "vanilla": (VANILLA_FORWARD, VANILLA_BACKWARD),
    "peephole": (PEEPHOLE_FORWARD, PEEPHOLE_BACKWARD),
    "layernorm": (LAYERNORM_FORWARD, LAYERNORM_BACKWARD),
}


