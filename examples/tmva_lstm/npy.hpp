// A tiny reader and writer of NumPy .npy files: C order, little-endian float64 ('<f8') or
// float32 ('<f4'), format version 1.0 (2.0 is read too). Enough for the command protocol.
#pragma once

#include <cstdint>
#include <fstream>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

namespace npy {

template <typename T> const char* descr();
template <> inline const char* descr<double>() { return "<f8"; }
template <> inline const char* descr<float>() { return "<f4"; }

template <typename T>
struct Array {
    std::vector<std::size_t> shape;
    std::vector<T> data;  // C order
};

// The value of 'key' in the header dict, as text (up to the next ',' at depth 0 or the closing '}').
inline std::string header_field(const std::string& header, const std::string& key) {
    std::size_t at = header.find("'" + key + "'");
    if (at == std::string::npos) throw std::runtime_error("npy header has no '" + key + "'");
    at = header.find(':', at) + 1;
    int depth = 0;
    std::size_t end = at;
    for (; end < header.size(); ++end) {
        char ch = header[end];
        if (ch == '(') ++depth;
        if (ch == ')') --depth;
        if ((ch == ',' && depth == 0) || ch == '}') break;
    }
    std::string value = header.substr(at, end - at);
    std::size_t first = value.find_first_not_of(" '\"");
    std::size_t last = value.find_last_not_of(" '\"");
    return first == std::string::npos ? "" : value.substr(first, last - first + 1);
}

template <typename T>
Array<T> load(const std::string& path) {
    std::ifstream in(path, std::ios::binary);
    if (!in) throw std::runtime_error("cannot open " + path);
    char magic[8];
    in.read(magic, 8);
    if (!in || std::string(magic, 6) != "\x93NUMPY") throw std::runtime_error(path + " is not a .npy file");
    std::uint32_t header_len = 0;
    if (magic[6] == 1) {
        unsigned char b[2];
        in.read(reinterpret_cast<char*>(b), 2);
        header_len = b[0] | (b[1] << 8);
    } else {
        unsigned char b[4];
        in.read(reinterpret_cast<char*>(b), 4);
        header_len = b[0] | (b[1] << 8) | (b[2] << 16) | (static_cast<std::uint32_t>(b[3]) << 24);
    }
    std::string header(header_len, ' ');
    in.read(&header[0], header_len);
    if (header_field(header, "descr") != descr<T>())
        throw std::runtime_error(path + ": expected dtype " + descr<T>() + ", got " + header_field(header, "descr"));
    if (header_field(header, "fortran_order") != "False")
        throw std::runtime_error(path + ": expected C order");
    Array<T> a;
    std::string shape = header_field(header, "shape");  // "(3, 4)", "(5,)" or "()"
    std::stringstream dims(shape.substr(1, shape.size() - 2));
    std::string item;
    std::size_t count = 1;
    while (std::getline(dims, item, ','))
        if (item.find_first_not_of(' ') != std::string::npos) {
            a.shape.push_back(std::stoul(item));
            count *= a.shape.back();
        }
    a.data.resize(count);
    in.read(reinterpret_cast<char*>(a.data.data()), static_cast<std::streamsize>(count * sizeof(T)));
    if (!in) throw std::runtime_error(path + ": the file is shorter than its shape says");
    return a;
}

template <typename T>
void save(const std::string& path, const std::vector<std::size_t>& shape, const std::vector<T>& data) {
    std::string dims;
    for (std::size_t n : shape) dims += std::to_string(n) + ", ";
    if (shape.size() > 1) dims.erase(dims.size() - 2);  // "(3, 4)"; a 1-D shape keeps its comma: "(5,)"
    else if (shape.size() == 1) dims.erase(dims.size() - 1);
    std::string header = std::string("{'descr': '") + descr<T>() + "', 'fortran_order': False, 'shape': (" + dims +
                         "), }";
    std::size_t total = 10 + header.size() + 1;  // magic, version, length, header, newline
    header.append((64 - total % 64) % 64, ' ');
    header += '\n';
    std::ofstream out(path, std::ios::binary);
    if (!out) throw std::runtime_error("cannot write " + path);
    out.write("\x93NUMPY\x01\x00", 8);
    unsigned char len[2] = {static_cast<unsigned char>(header.size() & 0xff),
                            static_cast<unsigned char>(header.size() >> 8)};
    out.write(reinterpret_cast<char*>(len), 2);
    out.write(header.data(), static_cast<std::streamsize>(header.size()));
    out.write(reinterpret_cast<const char*>(data.data()), static_cast<std::streamsize>(data.size() * sizeof(T)));
    if (!out) throw std::runtime_error("writing " + path + " failed");
}

}  // namespace npy
