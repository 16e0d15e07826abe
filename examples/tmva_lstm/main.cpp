// The TMVA-style LSTM behind lstm-harness's command protocol:
//
//   tmva_lstm REQUEST_DIR RESPONSE_DIR
//
// reads request.json, x.npy, h0.npy, c0.npy and each gate's W_<gate>.npy (H, D), R_<gate>.npy (H, H),
// b_<gate>.npy (H) for the gates i, f, g, o (and dy.npy, dh_T.npy, dc_T.npy when gradients are asked
// for); writes y.npy, h_T.npy, c_T.npy (and grad_<name>.npy for every input) into RESPONSE_DIR.
// Certify it with:  lstm-harness certify --command ./tmva_lstm --per-gate separate
#include <algorithm>
#include <fstream>
#include <iostream>
#include <sstream>
#include <string>

#include "lstm.hpp"
#include "npy.hpp"

static const char* kGateNames[kGates] = {"i", "f", "g", "o"};

static std::string read_text(const std::string& path) {
    std::ifstream in(path);
    if (!in) throw std::runtime_error("cannot open " + path);
    std::stringstream text;
    text << in.rdbuf();
    std::string s = text.str();
    s.erase(std::remove_if(s.begin(), s.end(), [](char ch) { return ch == ' ' || ch == '\n'; }), s.end());
    return s;  // request.json without blanks: "key":value
}

template <typename T>
static int run(const std::string& req, const std::string& resp, bool gradients) {
    auto load = [&](const std::string& name) { return npy::load<T>(req + "/" + name + ".npy"); };
    npy::Array<T> x = load("x"), h0 = load("h0"), c0 = load("c0");
    const std::size_t steps = x.shape[0], B = x.shape[1], D = x.shape[2], H = h0.shape[1];
    Lstm<T> lstm{D, H, {}};
    for (int k = 0; k < kGates; ++k) {
        const std::string g = kGateNames[k];
        lstm.gates[k] = Gate<T>{load("W_" + g).data, load("R_" + g).data, load("b_" + g).data};
    }
    std::vector<T> h = h0.data, c = c0.data;
    std::vector<Step<T>> tape;
    std::vector<T> y = lstm.forward(x.data, steps, B, h, c, tape);
    npy::save(resp + "/y.npy", {steps, B, H}, y);
    npy::save(resp + "/h_T.npy", {B, H}, h);
    npy::save(resp + "/c_T.npy", {B, H}, c);
    if (!gradients) return 0;
    std::vector<T> dh = load("dh_T").data, dc = load("dc_T").data, dx;
    Gate<T> grads[kGates];
    lstm.backward(x.data, load("dy").data, B, tape, dh, dc, dx, grads);
    npy::save(resp + "/grad_x.npy", {steps, B, D}, dx);
    npy::save(resp + "/grad_h0.npy", {B, H}, dh);
    npy::save(resp + "/grad_c0.npy", {B, H}, dc);
    for (int k = 0; k < kGates; ++k) {
        const std::string g = kGateNames[k];
        npy::save(resp + "/grad_W_" + g + ".npy", {H, D}, grads[k].input_weights);
        npy::save(resp + "/grad_R_" + g + ".npy", {H, H}, grads[k].state_weights);
        npy::save(resp + "/grad_b_" + g + ".npy", {H}, grads[k].bias);
    }
    return 0;
}

int main(int argc, char** argv) {
    if (argc < 3) {
        std::cerr << "usage: " << argv[0] << " REQUEST_DIR RESPONSE_DIR\n";
        return 2;
    }
    const std::string req = argv[argc - 2], resp = argv[argc - 1];
    try {
        const std::string request = read_text(req + "/request.json");
        if (request.find("\"variant\":\"vanilla\"") == std::string::npos) {
            std::cerr << "tmva_lstm: only the vanilla variant is implemented; request: " << request << "\n";
            return 2;
        }
        const bool gradients = request.find("\"gradients\":true") != std::string::npos;
        if (request.find("\"dtype\":\"float32\"") != std::string::npos) return run<float>(req, resp, gradients);
        return run<double>(req, resp, gradients);
    } catch (const std::exception& e) {
        std::cerr << "tmva_lstm: " << e.what() << "\n";
        return 1;
    }
}
