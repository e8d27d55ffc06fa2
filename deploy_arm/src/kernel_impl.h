// Kernel templates shared by every instruction set.
//
// Each per-ISA source file defines a struct Ops (the vector type and its
// operations) and then includes this file inside an anonymous namespace, so
// every translation unit gets its own copy compiled for its instruction
// set. Ops provides:
//   Vec, kLanes, zero(), set1(float), load(const float*),
//   add(a, b), mul(a, b), fmadd(a, b, c) = a * b + c (fused or not),
//   fused(a, b, c) = a * b + c rounded once (a fused multiply-add),
//   max(a, b), min(a, b), store(float*, Vec, int lanes).
//
// The quantized kernel performs the same float operations in the same
// order for every lane of every instruction set, so all of them produce
// bit-identical results. An output channel's taps are split into
// input-channel blocks (a fixed size per layer, see QuantConv2d) and, within
// a block, into groups by codebook index. Within a group the taps alternate
// between two partial sums (even and odd positions), the group sum is
// even + odd, the channel's sum adds value * group_sum over the groups of
// all blocks in order, and the output is (sum * scale + bias) -> activation,
// with each multiply and add rounded separately (no fused multiply-add).
// The build compiles with -ffp-contract=off so the compiler keeps it so.
//
// The quantized table-lookup kernel accumulates with fused(), which every
// ISA rounds once (the scalar one through std::fma), and applies scale
// and bias with separate multiply and add, so it is bit-identical across
// ISAs too. The dense kernel uses fmadd(), fused on the SIMD paths and not
// in the scalar one, so its results differ by rounding only.

template <class Ops>
inline typename Ops::Vec activate(typename Ops::Vec y, Activation act) {
  if (act == Activation::kReLU) {
    return Ops::max(y, Ops::zero());
  }
  if (act == Activation::kReLU6) {
    return Ops::min(Ops::max(y, Ops::zero()), Ops::set1(6.0f));
  }
  return y;
}

// Computes kTile segments (output pixel runs) of one tile for the output
// channels [o_begin, o_end) by accumulating inputs per codebook index.
// The input channels are processed in blocks, each block for all output
// channels before the next, so the tile's inputs of one block stay in L1
// cache. The partial sums wait in scratch between blocks.
template <class Ops, int kTile>
void quant_tile(const QuantKernelArgs& args, int64_t tile, int64_t o_begin,
                int64_t o_end, float* scratch) {
  using Vec = typename Ops::Vec;
  const Segment* segments = args.segments + tile * kTile;
  const int64_t blocks = args.channel_blocks;

  for (int64_t block = 0; block < blocks; ++block) {
    for (int64_t o = o_begin; o < o_end; ++o) {
      const float* group_input =
          args.input + (o / args.out_per_group) * args.group_input_stride;
      const float* base[kTile];
      for (int s = 0; s < kTile; ++s) {
        base[s] = group_input + segments[s].input_offset;
      }

      float* partial = scratch + (o - o_begin) * kTile * Ops::kLanes;
      Vec out[kTile];
      for (int s = 0; s < kTile; ++s) {
        out[s] = block == 0 ? Ops::zero()
                            : Ops::load(partial + s * Ops::kLanes);
      }

      const int64_t slot = o * blocks + block;
      const int32_t* offsets = args.offsets + args.tap_begin[slot];
      for (int64_t g = args.group_begin[slot]; g < args.group_begin[slot + 1];
           ++g) {
        const QuantGroup group = args.groups[g];
        Vec even[kTile];
        Vec odd[kTile];
        for (int s = 0; s < kTile; ++s) {
          even[s] = Ops::zero();
          odd[s] = Ops::zero();
        }

        int32_t t = 0;
        for (; t + 1 < group.count; t += 2) {
          const int32_t d0 = offsets[t];
          const int32_t d1 = offsets[t + 1];
          for (int s = 0; s < kTile; ++s) {
            even[s] = Ops::add(even[s], Ops::load(base[s] + d0));
            odd[s] = Ops::add(odd[s], Ops::load(base[s] + d1));
          }
        }
        if (t < group.count) {
          const int32_t d0 = offsets[t];
          for (int s = 0; s < kTile; ++s) {
            even[s] = Ops::add(even[s], Ops::load(base[s] + d0));
          }
        }
        offsets += group.count;

        const Vec value = Ops::set1(group.value);
        for (int s = 0; s < kTile; ++s) {
          out[s] =
              Ops::add(out[s], Ops::mul(value, Ops::add(even[s], odd[s])));
        }
      }

      if (block + 1 < blocks) {
        for (int s = 0; s < kTile; ++s) {
          Ops::store(partial + s * Ops::kLanes, out[s], Ops::kLanes);
        }
        continue;
      }

      const Vec scale = Ops::set1(args.scale[o]);
      const Vec bias = Ops::set1(args.bias[o]);
      float* out_plane = args.output + o * args.out_plane;
      for (int s = 0; s < kTile; ++s) {
        const Vec y = Ops::add(Ops::mul(out[s], scale), bias);
        Ops::store(out_plane + segments[s].output_offset,
                   activate<Ops>(y, args.activation), segments[s].lanes);
      }
    }
  }
}

// The inputs of one tile for the dense-style kernels: either read in
// place from the prepared input (tap t at base[s] + offsets[t]) or from a
// panel with the tile's inputs under every tap packed contiguously (tap t
// at panel + t * kTile * kLanes + s * kLanes). Packing pays for 1x1
// layers: read in place, their taps are one channel plane apart each, and
// big planes make those loads miss the TLB and the prefetchers. The
// packed values are the same floats, so results do not change.
template <class Ops, int kTile>
struct TileInputs {
  const float* base[kTile] = {};
  const int32_t* offsets = nullptr;  // null when packed

  // Points at the tile's inputs of conv group `group`; packs them into
  // panel_storage when `pack` is set. With `partial`, the input is the
  // layer's unprepared input (flat 1x1 plans), which has no slack after
  // the last pixel, so segments with fewer than kLanes pixels are loaded
  // partially and packing is required.
  void prepare(const float* input, int64_t group_input_stride,
               const int32_t* tap_offsets, int64_t taps,
               const Segment* segments, int64_t group, bool pack,
               bool partial, std::vector<float>* panel_storage) {
    const float* group_input = input + group * group_input_stride;
    for (int s = 0; s < kTile; ++s) {
      base[s] = group_input + segments[s].input_offset;
    }
    offsets = tap_offsets;
    if (!pack) return;
    constexpr int64_t kWidth = kTile * Ops::kLanes;
    if (static_cast<int64_t>(panel_storage->size()) < taps * kWidth) {
      panel_storage->resize(taps * kWidth);
    }
    float* panel = panel_storage->data();
    for (int64_t t = 0; t < taps; ++t) {
      for (int s = 0; s < kTile; ++s) {
        const float* source = base[s] + tap_offsets[t];
        const typename Ops::Vec x =
            partial && segments[s].lanes < Ops::kLanes
                ? Ops::load_partial(source, segments[s].lanes)
                : Ops::load(source);
        Ops::store(panel + t * kWidth + s * Ops::kLanes, x, Ops::kLanes);
      }
    }
    for (int s = 0; s < kTile; ++s) base[s] = panel + s * Ops::kLanes;
    offsets = nullptr;
  }

  void load(int64_t t, typename Ops::Vec x[kTile]) const {
    const int64_t d = offsets != nullptr ? offsets[t]
                                         : t * kTile * Ops::kLanes;
    for (int s = 0; s < kTile; ++s) x[s] = Ops::load(base[s] + d);
  }
};

// Computes kTile segments of one tile for kOutBlock output channels per
// block, blocks [block_begin, block_end): each input vector is loaded once
// and multiplied into kOutBlock accumulators.
template <class Ops, int kTile, int kOutBlock>
void dense_tile(const DenseKernelArgs& args, int64_t tile,
                int64_t block_begin, int64_t block_end) {
  using Vec = typename Ops::Vec;
  const Segment* segments = args.segments + tile * kTile;
  thread_local std::vector<float> panel;
  const bool pack =
      args.raw_input || (args.pack_inputs && block_end - block_begin > 1);
  TileInputs<Ops, kTile> inputs;
  int64_t prepared_group = -1;

  for (int64_t block = block_begin; block < block_end; ++block) {
    const int64_t group = block / args.blocks_per_group;
    const int64_t first_local = (block % args.blocks_per_group) * kOutBlock;
    if (group != prepared_group) {
      inputs.prepare(args.input, args.group_input_stride, args.offsets,
                     args.taps, segments, group, pack, args.raw_input,
                     &panel);
      prepared_group = group;
    }

    Vec acc[kOutBlock][kTile];
    for (int j = 0; j < kOutBlock; ++j) {
      for (int s = 0; s < kTile; ++s) acc[j][s] = Ops::zero();
    }

    const float* weights = args.weights + block * args.taps * kOutBlock;
    for (int64_t t = 0; t < args.taps; ++t) {
      Vec x[kTile];
      inputs.load(t, x);
      for (int j = 0; j < kOutBlock; ++j) {
        const Vec w = Ops::set1(weights[t * kOutBlock + j]);
        for (int s = 0; s < kTile; ++s) {
          acc[j][s] = Ops::fmadd(w, x[s], acc[j][s]);
        }
      }
    }

    for (int j = 0; j < kOutBlock; ++j) {
      if (first_local + j >= args.out_per_group) break;
      const int64_t o = group * args.out_per_group + first_local + j;
      const Vec bias = Ops::set1(args.bias[o]);
      float* out_plane = args.output + o * args.out_plane;
      if (args.scale != nullptr) {
        const Vec scale = Ops::set1(args.scale[o]);
        for (int s = 0; s < kTile; ++s) {
          const Vec y = Ops::fused(acc[j][s], scale, bias);
          Ops::store(out_plane + segments[s].output_offset,
                     activate<Ops>(y, args.activation), segments[s].lanes);
        }
        continue;
      }
      for (int s = 0; s < kTile; ++s) {
        const Vec y = Ops::add(acc[j][s], bias);
        Ops::store(out_plane + segments[s].output_offset,
                   activate<Ops>(y, args.activation), segments[s].lanes);
      }
    }
  }
}

// Computes kTile segments of one tile for kOutBlock output channels per
// block, decoding each weight as codebook[index] inside the loop: the
// dense kernel's blocking with 1-byte weights.
template <class Ops, int kTile, int kOutBlock>
void lookup_tile(const LookupKernelArgs& args, int64_t tile,
                 int64_t block_begin, int64_t block_end) {
  using Vec = typename Ops::Vec;
  const Segment* segments = args.segments + tile * kTile;
  thread_local std::vector<float> panel;
  const bool pack =
      args.raw_input || (args.pack_inputs && block_end - block_begin > 1);
  TileInputs<Ops, kTile> inputs;
  int64_t prepared_group = -1;

  for (int64_t block = block_begin; block < block_end; ++block) {
    const int64_t group = block / args.blocks_per_group;
    const int64_t first_local = (block % args.blocks_per_group) * kOutBlock;
    if (group != prepared_group) {
      inputs.prepare(args.input, args.group_input_stride, args.offsets,
                     args.taps, segments, group, pack, args.raw_input,
                     &panel);
      prepared_group = group;
    }

    Vec acc[kOutBlock][kTile];
    for (int j = 0; j < kOutBlock; ++j) {
      for (int s = 0; s < kTile; ++s) acc[j][s] = Ops::zero();
    }

    const uint8_t* indices = args.indices + block * args.taps * kOutBlock;
    for (int64_t t = 0; t < args.taps; ++t) {
      Vec x[kTile];
      inputs.load(t, x);
      for (int j = 0; j < kOutBlock; ++j) {
        const Vec w = Ops::set1(args.codebook[indices[t * kOutBlock + j]]);
        for (int s = 0; s < kTile; ++s) {
          acc[j][s] = Ops::fused(w, x[s], acc[j][s]);
        }
      }
    }

    for (int j = 0; j < kOutBlock; ++j) {
      if (first_local + j >= args.out_per_group) break;
      const int64_t o = group * args.out_per_group + first_local + j;
      const Vec scale = Ops::set1(args.scale[o]);
      const Vec bias = Ops::set1(args.bias[o]);
      float* out_plane = args.output + o * args.out_plane;
      for (int s = 0; s < kTile; ++s) {
        const Vec y = Ops::add(Ops::mul(acc[j][s], scale), bias);
        Ops::store(out_plane + segments[s].output_offset,
                   activate<Ops>(y, args.activation), segments[s].lanes);
      }
    }
  }
}
