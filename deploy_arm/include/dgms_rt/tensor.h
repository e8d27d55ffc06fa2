// A float32 tensor with its shape, as the graph executor passes them.
#pragma once

#include <cstdint>
#include <cstddef>
#include <memory>
#include <new>
#include <string>
#include <utility>
#include <vector>

namespace dgms_rt {

// An allocator that leaves new floats uninitialised: resize() on a
// FloatVector does not zero-fill, so the executor can reuse a tensor's
// buffer for a larger tensor without writing it twice. Its buffers start
// on a 64-byte cache line. So do a tensor's channel planes where their
// size is a multiple of 16 floats, and threads that write neighbouring
// parts of a plane share fewer lines. Everything else behaves as
// std::allocator.
template <class T>
struct UninitializedAllocator : std::allocator<T> {
  static constexpr std::align_val_t kAlignment{64};
  template <class U>
  struct rebind {
    using other = UninitializedAllocator<U>;
  };
  UninitializedAllocator() = default;
  template <class U>
  UninitializedAllocator(const UninitializedAllocator<U>&) noexcept {}
  T* allocate(std::size_t n) {
    if (n > std::size_t(-1) / sizeof(T)) throw std::bad_array_new_length();
    return static_cast<T*>(::operator new(n * sizeof(T), kAlignment));
  }
  void deallocate(T* p, std::size_t) noexcept {
    ::operator delete(p, kAlignment);
  }
  template <class U>
  void construct(U* p) noexcept {
    ::new (static_cast<void*>(p)) U;
  }
  template <class U, class... Args>
  void construct(U* p, Args&&... args) {
    ::new (static_cast<void*>(p)) U(std::forward<Args>(args)...);
  }
};

// Float storage of tensors. Note: FloatVector(n) and resize(n) leave the
// new values unspecified; use assign(n, 0.0f) for zeros.
using FloatVector = std::vector<float, UninitializedAllocator<float>>;

struct Tensor {
  std::vector<int64_t> shape;  // e.g. (N, C, H, W) or (N, features)
  FloatVector data;            // row-major, product(shape) values

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
