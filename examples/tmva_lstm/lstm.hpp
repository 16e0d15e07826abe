// An LSTM layer in the style of ROOT's TMVA: each gate has its own input-weight matrix (H x D),
// state-weight matrix (H x H) and bias (H), instead of one stacked (4H x D) matrix. Forward pass and
// backpropagation through time written out by hand, for double or float.
//
//   i = sigmoid(Wi x + Ri h + bi)   f = sigmoid(Wf x + Rf h + bf)   g = tanh(Wg x + Rg h + bg)
//   o = sigmoid(Wo x + Ro h + bo)   c' = f * c + i * g              h' = o * tanh(c')
//
// Building with -DPLANTED_BUG_FORGET_DERIVATIVE plants a mistake in the backward pass: the forget
// gate's derivative takes c_t where it needs c_{t-1}. The forward pass is unchanged.
#pragma once

#include <cmath>
#include <cstddef>
#include <vector>

enum GateIndex { kInput = 0, kForget = 1, kCandidate = 2, kOutput = 3 };
constexpr int kGates = 4;

template <typename T>
struct Gate {
    std::vector<T> input_weights;  // (H, D), row-major
    std::vector<T> state_weights;  // (H, H)
    std::vector<T> bias;           // (H)
};

template <typename T>
struct Step {  // what one time step keeps for the backward pass, each (B, H)
    std::vector<T> h_prev, c_prev, c, act[kGates];
};

template <typename T>
struct Lstm {
    std::size_t D, H;
    Gate<T> gates[kGates];  // i, f, g, o

    // x (T, B, D), h0 and c0 (B, H) -> y (T, B, H); h and c end as the final states.
    std::vector<T> forward(const std::vector<T>& x, std::size_t steps, std::size_t B, std::vector<T>& h,
                           std::vector<T>& c, std::vector<Step<T>>& tape) const {
        std::vector<T> y(steps * B * H);
        tape.assign(steps, Step<T>());
        for (std::size_t t = 0; t < steps; ++t) {
            Step<T>& s = tape[t];
            s.h_prev = h;
            s.c_prev = c;
            for (int k = 0; k < kGates; ++k) {
                s.act[k] = preactivation(gates[k], &x[t * B * D], h, B);
                for (T& a : s.act[k]) a = (k == kCandidate) ? std::tanh(a) : sigmoid(a);
            }
            for (std::size_t n = 0; n < B * H; ++n) {
                c[n] = s.act[kForget][n] * s.c_prev[n] + s.act[kInput][n] * s.act[kCandidate][n];
                h[n] = s.act[kOutput][n] * std::tanh(c[n]);
                y[t * B * H + n] = h[n];
            }
            s.c = c;
        }
        return y;
    }

    // Gradients of the loss with respect to x (T, B, D), h0 and c0 (B, H) and every gate's weights,
    // given dy (T, B, H) and the final states' gradients dh and dc (B, H; they end as dh0 and dc0).
    void backward(const std::vector<T>& x, const std::vector<T>& dy, std::size_t B, const std::vector<Step<T>>& tape,
                  std::vector<T>& dh, std::vector<T>& dc, std::vector<T>& dx, Gate<T> grads[kGates]) const {
        const std::size_t steps = tape.size();
        dx.assign(steps * B * D, T(0));
        for (int k = 0; k < kGates; ++k) {
            grads[k].input_weights.assign(H * D, T(0));
            grads[k].state_weights.assign(H * H, T(0));
            grads[k].bias.assign(H, T(0));
        }
        std::vector<T> da[kGates];  // gradients of the pre-activations, (B, H)
        for (std::size_t t = steps; t-- > 0;) {
            const Step<T>& s = tape[t];
            for (int k = 0; k < kGates; ++k) da[k].assign(B * H, T(0));
            for (std::size_t n = 0; n < B * H; ++n) {
                const T i = s.act[kInput][n], f = s.act[kForget][n], g = s.act[kCandidate][n], o = s.act[kOutput][n];
                const T tc = std::tanh(s.c[n]);
                const T dh_n = dh[n] + dy[t * B * H + n];
                const T dc_n = dc[n] + dh_n * o * (T(1) - tc * tc);
                da[kOutput][n] = dh_n * tc * o * (T(1) - o);
                da[kInput][n] = dc_n * g * i * (T(1) - i);
                da[kCandidate][n] = dc_n * i * (T(1) - g * g);
#ifdef PLANTED_BUG_FORGET_DERIVATIVE
                da[kForget][n] = dc_n * s.c[n] * f * (T(1) - f);
#else
                da[kForget][n] = dc_n * s.c_prev[n] * f * (T(1) - f);
#endif
                dc[n] = dc_n * f;
            }
            std::fill(dh.begin(), dh.end(), T(0));
            for (int k = 0; k < kGates; ++k)
                for (std::size_t b = 0; b < B; ++b)
                    for (std::size_t j = 0; j < H; ++j) {
                        const T d = da[k][b * H + j];
                        grads[k].bias[j] += d;
                        for (std::size_t m = 0; m < D; ++m) {
                            grads[k].input_weights[j * D + m] += d * x[(t * B + b) * D + m];
                            dx[(t * B + b) * D + m] += d * gates[k].input_weights[j * D + m];
                        }
                        for (std::size_t m = 0; m < H; ++m) {
                            grads[k].state_weights[j * H + m] += d * s.h_prev[b * H + m];
                            dh[b * H + m] += d * gates[k].state_weights[j * H + m];
                        }
                    }
        }
    }

  private:
    static T sigmoid(T a) { return T(1) / (T(1) + std::exp(-a)); }

    // W x_t + R h + b for one gate: (B, H).
    std::vector<T> preactivation(const Gate<T>& gate, const T* xt, const std::vector<T>& h, std::size_t B) const {
        std::vector<T> a(B * H);
        for (std::size_t b = 0; b < B; ++b)
            for (std::size_t j = 0; j < H; ++j) {
                T sum = gate.bias[j];
                for (std::size_t m = 0; m < D; ++m) sum += gate.input_weights[j * D + m] * xt[b * D + m];
                for (std::size_t m = 0; m < H; ++m) sum += gate.state_weights[j * H + m] * h[b * H + m];
                a[b * H + j] = sum;
            }
        return a;
    }
};
