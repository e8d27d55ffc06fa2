// A float32 tensor with its shape, as the graph executor passes them.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace dgms_rt {

struct Tensor {
  std::vector<int64_t> shape;  // e.g. (N, C, H, W) or (N, features)
  std::vector<float> data;     // row-major, product(shape) values

  int64_t numel() const {
    int64_t n = 1;
    for (int64_t d : shape) n *= d;
    return n;
  }
  std::string shape_string() const {
    std::string s = "(";
    for (size_t i = 0; i < shape.size(); ++i)
      s += (i ? ", " : "") + std::to_string(shape[i]);
    return s + ")";
  }
};

}  // namespace dgms_rt
