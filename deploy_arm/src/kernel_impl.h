// Kernel templates shared by every instruction set.
//
// Each per-ISA source file defines a struct Ops (the vector type and its
// operations) and then includes this file inside an anonymous namespace, so
// every translation unit gets its own copy compiled for its instruction
// set. Ops provides:
//   Vec, kLanes, zero(), set1(float), load(const float*),
//   add(a, b), mul(a, b), fmadd(a, b, c) = a * b + c (fused or not),
//   fused(a, b, c) = a * b + c rounded once (a fused multiply-add),
//   max(a, b), min(a, b), store(float*, Vec, int lanes),
//   deinterleave4(const float* p, Vec phase[4]): the 4 * kLanes floats at
//   p split by index modulo 4,
//   store_columns4(const Vec v[4], float* const dst[kLanes]): lane l of
//   v[0..3] stored as the 4 floats at dst[l].
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

// Calls body(std::integral_constant<Activation, act>) for the run-time
// activation, so the kernels' epilogues are compiled once per activation
// with no branch per stored vector.
template <class Body>
inline void with_activation(Activation act, Body&& body) {
  switch (act) {
    case Activation::kReLU:
      body(std::integral_constant<Activation, Activation::kReLU>());
      return;
    case Activation::kReLU6:
      body(std::integral_constant<Activation, Activation::kReLU6>());
      return;
    default:
      body(std::integral_constant<Activation, Activation::kNone>());
      return;
  }
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
  // panel_storage when `pack` is set.
  void prepare(const float* input, int64_t group_input_stride,
               const int32_t* tap_offsets, int64_t taps,
               const Segment* segments, int64_t group, bool pack,
               FloatVector* panel_storage) {
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
    bool whole = true;
    for (int s = 0; s < kTile; ++s) {
      whole = whole && segments[s].lanes == Ops::kLanes;
    }
    if (whole) {
      for (int64_t t = 0; t < taps; ++t) {
        for (int s = 0; s < kTile; ++s) {
          Ops::store(panel + t * kWidth + s * Ops::kLanes,
                     Ops::load(base[s] + tap_offsets[t]), Ops::kLanes);
        }
      }
    } else {
      // A tile with partial segments (the last of a flat plan) reads only
      // their pixels, because a flat plan's input ends at its last pixel.
      for (int64_t t = 0; t < taps; ++t) {
        for (int s = 0; s < kTile; ++s) {
          Ops::store(panel + t * kWidth + s * Ops::kLanes,
                     Ops::load_partial(base[s] + tap_offsets[t],
                                       segments[s].lanes),
                     Ops::kLanes);
        }
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

// Adds one tap to a sum as the lookup kernel (kLookup: fused, so every
// instruction set rounds once) or the dense kernel (fmadd) does.
template <class Ops, bool kLookup>
inline typename Ops::Vec accumulate_tap(typename Ops::Vec weight,
                                        typename Ops::Vec x,
                                        typename Ops::Vec sum) {
  return kLookup ? Ops::fused(weight, x, sum) : Ops::fmadd(weight, x, sum);
}

// Adds one tap of kTile input vectors x to the sums of kOutBlock output
// channels, whose weights are weights[first + j] (dense) or
// codebook[indices[first + j]] (lookup).
template <class Ops, int kTile, int kOutBlock, class Args>
inline void add_tap_to_block(const Args& args, int64_t first,
                             const typename Ops::Vec (&x)[kTile],
                             typename Ops::Vec (&acc)[kOutBlock][kTile]) {
  constexpr bool kLookup = std::is_same<Args, LookupKernelArgs>::value;
  for (int j = 0; j < kOutBlock; ++j) {
    typename Ops::Vec w;
    if constexpr (kLookup) {
      w = Ops::set1(args.codebook[args.indices[first + j]]);
    } else {
      w = Ops::set1(args.weights[first + j]);
    }
    for (int s = 0; s < kTile; ++s) {
      acc[j][s] = accumulate_tap<Ops, kLookup>(w, x[s], acc[j][s]);
    }
  }
}

// Applies scale and bias to a sum as the lookup kernel (sum * scale +
// bias, rounded twice) or the dense kernel (fma(sum, scale, bias) with a
// scale, sum + bias without) does.
template <class Ops, bool kLookup>
inline typename Ops::Vec scale_and_bias(typename Ops::Vec sum,
                                        typename Ops::Vec scale,
                                        typename Ops::Vec bias,
                                        bool has_scale) {
  if (kLookup) return Ops::add(Ops::mul(sum, scale), bias);
  if (has_scale) return Ops::fused(sum, scale, bias);
  return Ops::add(sum, bias);
}

// Turns a sum into an output: scale_and_bias, then the activation.
template <class Ops, bool kLookup, Activation kAct>
inline typename Ops::Vec finish_output(typename Ops::Vec sum,
                                       typename Ops::Vec scale,
                                       typename Ops::Vec bias,
                                       bool has_scale) {
  return activate<Ops>(scale_and_bias<Ops, kLookup>(sum, scale, bias,
                                                    has_scale),
                       kAct);
}

// Computes kTile segments of one tile for kOutBlock output channels per
// block, blocks [block_begin, block_end), with dense weights (Args =
// DenseKernelArgs) or 1-byte codebook indices decoded as codebook[index]
// inside the loop (LookupKernelArgs). Each input vector is loaded once and
// multiplied into kOutBlock accumulators.
//
// The activation is a run-time argument. As a template argument, its
// constants (0 and 6) stayed in registers across the tap loop. The 12
// accumulators then no longer fit in the 16 AVX2 registers, so one
// spilled to the stack and the kernel ran at half speed.
template <class Ops, int kTile, int kOutBlock, class Args>
void tile_body(const Args& args, const Segment* segments, int64_t block_begin,
               int64_t block_end) {
  using Vec = typename Ops::Vec;
  constexpr bool kLookup = std::is_same<Args, LookupKernelArgs>::value;
  thread_local FloatVector panel;
  const bool pack = args.flat_input ||
                    (args.pack_inputs && block_end - block_begin > 1);
  TileInputs<Ops, kTile> inputs;
  int64_t prepared_group = -1;

  // With many taps (a 3x3 conv over tens of channels or more) the tile's
  // inputs under all taps outgrow the L1 cache, and every block would read
  // them from L2 or memory again. So the taps run in chunks of
  // kTileTapChunk, each for all blocks of the item, with the sums kept in
  // `partial` between chunks. The sums leave and re-enter the registers
  // unchanged, so the results are the same bits.
  constexpr int64_t kWidth = kTile * Ops::kLanes;
  const int64_t taps = args.taps;
  const int64_t blocks = block_end - block_begin;
  const int64_t chunk =
      !pack && blocks > 1 && taps > kTileTapChunk ? kTileTapChunk : taps;
  thread_local FloatVector partial;
  if (chunk < taps &&
      static_cast<int64_t>(partial.size()) < blocks * kOutBlock * kWidth) {
    partial.resize(blocks * kOutBlock * kWidth);
  }

  for (int64_t t0 = 0; t0 < taps; t0 += chunk) {
    const int64_t t1 = std::min(taps, t0 + chunk);
    for (int64_t block = block_begin; block < block_end; ++block) {
      const int64_t group = block / args.blocks_per_group;
      const int64_t first_local = (block % args.blocks_per_group) * kOutBlock;
      if (group != prepared_group) {
        inputs.prepare(args.input, args.group_input_stride, args.offsets,
                       args.taps, segments, group, pack, &panel);
        prepared_group = group;
      }

      float* sums = nullptr;
      if (chunk < taps) {
        sums = partial.data() + (block - block_begin) * kOutBlock * kWidth;
      }
      Vec acc[kOutBlock][kTile];
      for (int j = 0; j < kOutBlock; ++j) {
        for (int s = 0; s < kTile; ++s) {
          acc[j][s] = t0 == 0 ? Ops::zero()
                              : Ops::load(sums + j * kWidth + s * Ops::kLanes);
        }
      }

      const int64_t weight_base = block * taps * kOutBlock;
      for (int64_t t = t0; t < t1; ++t) {
        Vec x[kTile];
        inputs.load(t, x);
        add_tap_to_block<Ops, kTile, kOutBlock>(
            args, weight_base + t * kOutBlock, x, acc);
      }

      if (t1 < taps) {
        for (int j = 0; j < kOutBlock; ++j) {
          for (int s = 0; s < kTile; ++s) {
            Ops::store(sums + j * kWidth + s * Ops::kLanes, acc[j][s],
                       Ops::kLanes);
          }
        }
        continue;
      }

      for (int j = 0; j < kOutBlock; ++j) {
        if (first_local + j >= args.out_per_group) break;
        const int64_t o = group * args.out_per_group + first_local + j;
        const Vec scale =
            Ops::set1(args.scale != nullptr ? args.scale[o] : 1.0f);
        const Vec bias = Ops::set1(args.bias[o]);
        float* out_plane = args.output + o * args.out_plane;
        for (int s = 0; s < kTile; ++s) {
          const Vec y = scale_and_bias<Ops, kLookup>(acc[j][s], scale, bias,
                                                     args.scale != nullptr);
          Ops::store(out_plane + segments[s].output_offset,
                     activate<Ops>(y, args.activation), segments[s].lanes);
        }
      }
    }
  }
}

// Returns the first segment of tile `tile` in a plan whose tiles from
// args.full_tiles on have kTile - 1 segments (see ConvPlan::full_tiles).
template <int kTile, class Args>
const Segment* tile_start(const Args& args, int64_t tile) {
  if (tile < args.full_tiles) return args.segments + tile * kTile;
  return args.segments + args.full_tiles * kTile +
         (tile - args.full_tiles) * (kTile - 1);
}

// Computes tile `tile` with tile_body of its size. The one-channel kernels
// (kOutBlock 1) get plans without smaller tiles.
template <class Ops, int kTile, int kOutBlock, class Args>
void any_tile(const Args& args, int64_t tile, int64_t block_begin,
              int64_t block_end) {
  if constexpr (kTile > 1 && kOutBlock > 1) {
    if (tile >= args.full_tiles) {
      tile_body<Ops, kTile - 1, kOutBlock>(
          args, tile_start<kTile>(args, tile), block_begin, block_end);
      return;
    }
  }
  tile_body<Ops, kTile, kOutBlock>(args, tile_start<kTile>(args, tile),
                                   block_begin, block_end);
}

template <class Ops, int kTile, int kOutBlock>
void dense_tile(const DenseKernelArgs& args, int64_t tile,
                int64_t block_begin, int64_t block_end) {
  any_tile<Ops, kTile, kOutBlock>(args, tile, block_begin, block_end);
}

template <class Ops, int kTile, int kOutBlock>
void lookup_tile(const LookupKernelArgs& args, int64_t tile,
                 int64_t block_begin, int64_t block_end) {
  any_tile<Ops, kTile, kOutBlock>(args, tile, block_begin, block_end);
}

// A chunk of `tiles` tiles of kTile segments each, from segment `first`,
// for the output-channel blocks [block_begin, block_end), of a flat 1x1
// plan (ConvPlan::flat) or of a layer with few taps (see chunked_tiles). The tiles' inputs of a conv
// group are packed into one panel, [tile][tap][kTile * kLanes], reading
// each input channel (of a flat plan) as one contiguous run that the
// hardware prefetchers follow. Partial segments are loaded partially,
// because a flat plan's input has no slack after its last pixel. Then
// each block runs over all the tiles, writing kOutBlock contiguous output
// runs. Every output vector gets the same operations as in tile_body,
// so the results are the same bits.
template <class Ops, int kTile, int kOutBlock, class Args, Activation kAct,
          int kTaps>
void chunk_body(const Args& args, const Segment* first, int64_t tiles,
                int64_t block_begin, int64_t block_end) {
  using Vec = typename Ops::Vec;
  constexpr bool kLookup = std::is_same<Args, LookupKernelArgs>::value;
  constexpr int64_t kWidth = kTile * Ops::kLanes;
  const int64_t taps = kTaps > 0 ? kTaps : args.taps;
  constexpr int kTapGroup = 8;  // see the tap loop below
  thread_local FloatVector panel_storage;
  if (static_cast<int64_t>(panel_storage.size()) < tiles * taps * kWidth) {
    panel_storage.resize(tiles * taps * kWidth);
  }
  float* const panel = panel_storage.data();
  int64_t packed_group = -1;

  for (int64_t block = block_begin; block < block_end; ++block) {
    const int64_t group = block / args.blocks_per_group;
    const int64_t first_local = (block % args.blocks_per_group) * kOutBlock;
    if (group != packed_group) {
      const float* input = args.input + group * args.group_input_stride;
      for (int64_t t = 0; t < taps; ++t) {
        const float* source = input + args.offsets[t];
        for (int64_t i = 0; i < tiles; ++i) {
          const Segment* seg = first + i * kTile;
          float* dst = panel + (i * taps + t) * kWidth;
          for (int s = 0; s < kTile; ++s) {
            const float* x = source + seg[s].input_offset;
            Ops::store(dst + s * Ops::kLanes,
                       seg[s].lanes < Ops::kLanes
                           ? Ops::load_partial(x, seg[s].lanes)
                           : Ops::load(x),
                       Ops::kLanes);
          }
        }
      }
      packed_group = group;
    }

    const int64_t weight_base = block * taps * kOutBlock;
    // Initialised only to quiet GCC's may-be-uninitialised warning.
    Vec scale[kOutBlock] = {};
    Vec bias[kOutBlock] = {};
    float* out_plane[kOutBlock] = {};
    int outputs = 0;
    for (int j = 0; j < kOutBlock && first_local + j < args.out_per_group;
         ++j) {
      const int64_t o = group * args.out_per_group + first_local + j;
      scale[j] = Ops::set1(args.scale != nullptr ? args.scale[o] : 1.0f);
      bias[j] = Ops::set1(args.bias[o]);
      out_plane[j] = args.output + o * args.out_plane;
      ++outputs;
    }

    for (int64_t i = 0; i < tiles; ++i) {
      const Segment* seg = first + i * kTile;
      const float* x_tile = panel + i * taps * kWidth;
      Vec acc[kOutBlock][kTile];
      for (int j = 0; j < kOutBlock; ++j) {
        for (int s = 0; s < kTile; ++s) acc[j][s] = Ops::zero();
      }
      const auto add_tap = [&](int64_t t) {
        Vec x[kTile];
        for (int s = 0; s < kTile; ++s) {
          x[s] = Ops::load(x_tile + t * kWidth + s * Ops::kLanes);
        }
        add_tap_to_block<Ops, kTile, kOutBlock>(
            args, weight_base + t * kOutBlock, x, acc);
      };
      // Groups of a fixed number of taps: with one loop over a run-time
      // count, GCC left a vector register unused and read one input vector
      // from memory for every multiply-add, which cost about 15 % (AVX2).
      int64_t t = 0;
      for (; t + kTapGroup <= taps; t += kTapGroup) {
        for (int u = 0; u < kTapGroup; ++u) add_tap(t + u);
      }
      if constexpr (kTaps % kTapGroup != 0 || kTaps == 0) {
        for (; t < taps; ++t) add_tap(t);
      }
      // A tile of whole, consecutive vectors (all but the last tile of a
      // flat plan) stores without per-vector lane checks.
      bool whole = outputs == kOutBlock;
      for (int s = 0; s < kTile; ++s) {
        whole = whole && seg[s].lanes == Ops::kLanes &&
                seg[s].output_offset == seg[0].output_offset + s * Ops::kLanes;
      }
      if (whole) {
        for (int j = 0; j < kOutBlock; ++j) {
          float* out = out_plane[j] + seg[0].output_offset;
          for (int s = 0; s < kTile; ++s) {
            Ops::store(out + s * Ops::kLanes,
                       finish_output<Ops, kLookup, kAct>(
                           acc[j][s], scale[j], bias[j],
                           args.scale != nullptr),
                       Ops::kLanes);
          }
        }
        continue;
      }
      for (int j = 0; j < outputs; ++j) {
        for (int s = 0; s < kTile; ++s) {
          Ops::store(out_plane[j] + seg[s].output_offset,
                     finish_output<Ops, kLookup, kAct>(
                         acc[j][s], scale[j], bias[j], args.scale != nullptr),
                     seg[s].lanes);
        }
      }
    }
  }
}

// chunk_body for `tiles` tiles of kTile segments from segment `first`.
template <class Ops, int kTile, int kOutBlock, class Args>
void chunk_of_size(const Args& args, const Segment* first, int64_t tiles,
                   int64_t block_begin, int64_t block_end) {
  with_activation(args.activation, [&](auto act) {
    constexpr Activation kAct = decltype(act)::value;
    // The tap counts of MobileNetV2's widest expansions (16 and 24 input
    // channels) get fully unrolled copies: about 10 % faster than groups.
    // So does its 3x3 stem over 3 channels (27 taps): 4 % faster.
    if (args.taps == 16) {
      chunk_body<Ops, kTile, kOutBlock, Args, kAct, 16>(
          args, first, tiles, block_begin, block_end);
    } else if (args.taps == 24) {
      chunk_body<Ops, kTile, kOutBlock, Args, kAct, 24>(
          args, first, tiles, block_begin, block_end);
    } else if (args.taps == 27) {
      chunk_body<Ops, kTile, kOutBlock, Args, kAct, 27>(
          args, first, tiles, block_begin, block_end);
    } else {
      chunk_body<Ops, kTile, kOutBlock, Args, kAct, 0>(
          args, first, tiles, block_begin, block_end);
    }
  });
}

// The tiles [tile_begin, tile_end) of a plan whose tiles from
// args.full_tiles on have kTile - 1 segments (see ConvPlan::full_tiles).
template <class Ops, int kTile, int kOutBlock, class Args>
void chunk_tiles(const Args& shared_args, int64_t tile_begin,
                 int64_t tile_end, int64_t block_begin, int64_t block_end) {
  const Args args = shared_args;
  const int64_t full = args.full_tiles;
  if (tile_begin < full) {
    chunk_of_size<Ops, kTile, kOutBlock>(
        args, tile_start<kTile>(args, tile_begin),
        std::min(tile_end, full) - tile_begin, block_begin, block_end);
  }
  if constexpr (kTile > 1) {
    const int64_t begin = std::max(tile_begin, full);
    if (begin < tile_end) {
      chunk_of_size<Ops, kTile - 1, kOutBlock>(
          args, tile_start<kTile>(args, begin), tile_end - begin,
          block_begin, block_end);
    }
  }
}

// One depthwise channel: the output vectors (segments) kBlock at a time,
// each with its own sum, so that the sums do not wait on each other. Each
// output vector sums its taps in tap order with the same operations as
// tile_body with one-channel blocks, so the results are the same bits.
template <class Ops, bool kLookup, Activation kAct>
void depthwise_body(const DepthwiseArgs& a) {
  using Vec = typename Ops::Vec;
  constexpr int kBlock = 8;
  float w[kDepthwiseMaxTaps];
  const int64_t taps =
      a.taps < kDepthwiseMaxTaps ? a.taps : kDepthwiseMaxTaps;
  for (int64_t t = 0; t < taps; ++t) {
    w[t] = kLookup ? a.codebook[a.indices[t]] : a.weights[t];
  }
  const Vec scale = Ops::set1(a.scale);
  const Vec bias = Ops::set1(a.bias);
  const auto finish = [&](Vec acc) {
    return finish_output<Ops, kLookup, kAct>(acc, scale, bias, a.has_scale);
  };

  const Segment* seg = a.segments;
  int64_t left = a.num_segments;
  for (; left >= kBlock; left -= kBlock, seg += kBlock) {
    Vec acc[kBlock];
    const float* base[kBlock];
    for (int b = 0; b < kBlock; ++b) {
      acc[b] = Ops::zero();
      base[b] = a.input + seg[b].input_offset;
    }
    for (int64_t t = 0; t < taps; ++t) {
      const Vec weight = Ops::set1(w[t]);
      const int32_t d = a.offsets[t];
      for (int b = 0; b < kBlock; ++b) {
        acc[b] = accumulate_tap<Ops, kLookup>(weight, Ops::load(base[b] + d),
                                              acc[b]);
      }
    }
    for (int b = 0; b < kBlock; ++b) {
      Ops::store(a.output + seg[b].output_offset, finish(acc[b]),
                 seg[b].lanes);
    }
  }
  for (; left > 0; --left, ++seg) {
    Vec acc = Ops::zero();
    for (int64_t t = 0; t < taps; ++t) {
      acc = accumulate_tap<Ops, kLookup>(
          Ops::set1(w[t]),
          Ops::load(a.input + a.offsets[t] + seg->input_offset), acc);
    }
    Ops::store(a.output + seg->output_offset, finish(acc), seg->lanes);
  }
}

// Copies one channel plane into the prepared layout with vector loads and
// stores: calls to memcpy and memset per row cost more than the copy on
// the small planes of a detector's later layers. With kPadding false it
// copies only the data, into a buffer that already contains the zero
// padding of the same layout (see DepthwiseArgs::padding_ready). On small
// planes the padding costs as much as the data, and it is the same for
// every channel.
template <class Ops, bool kPadding>
void copy_plane(const PlaneLayout& p, const float* src, float* dst) {
  constexpr int64_t kLanes = Ops::kLanes;
  const typename Ops::Vec zero = Ops::zero();
  const auto fill_zero = [&](float* d, int64_t n) {
    int64_t i = 0;
    for (; i + kLanes <= n; i += kLanes) Ops::store(d + i, zero, kLanes);
    if (i < n) Ops::store(d + i, zero, static_cast<int>(n - i));
  };
  const int64_t width = p.width;
  if (kPadding) {
    const int64_t data_begin = p.pad_h * p.row_stride;
    const int64_t data_end = (p.pad_h + p.height) * p.row_stride;
    fill_zero(dst, data_begin);
    fill_zero(dst + data_end, p.plane - data_end);
  }
  if (p.stride_w == 1) {
    for (int64_t y = 0; y < p.height; ++y) {
      float* row = dst + (y + p.pad_h) * p.row_stride;
      const float* s = src + y * width;
      if (kPadding) fill_zero(row, p.pad_w);
      float* d = row + p.pad_w;
      int64_t i = 0;
      for (; i + kLanes <= width; i += kLanes) {
        Ops::store(d + i, Ops::load(s + i), kLanes);
      }
      if (i < width && width >= kLanes) {
        // The row's last vector again, overlapping the one before it: a
        // whole load and store instead of partial ones.
        Ops::store(d + width - kLanes, Ops::load(s + width - kLanes),
                   kLanes);
      } else if (i < width) {
        const int lanes = static_cast<int>(width - i);
        Ops::store(d + i, Ops::load_partial(s + i, lanes), lanes);
      }
      if (kPadding) fill_zero(d + width, p.row_stride - p.pad_w - width);
    }
    return;
  }
  if (p.stride_w == 2) {
    // The common stride runs in one pass per row. The even input columns
    // go to phase pad_w & 1 from position pad_w / 2, and the odd ones to
    // the other phase from position (pad_w + 1) / 2. The general loop
    // below takes three integer divisions per phase and channel, which
    // made a depthwise conv over 576 channels of 13 x 13 take 0.084
    // against 0.062 ms (one thread, AVX2).
    const int64_t even_phase = p.pad_w & 1;
    const int64_t even_begin = p.pad_w >> 1, odd_begin = (p.pad_w + 1) >> 1;
    const int64_t odd_count = width >> 1, even_count = width - odd_count;
    for (int64_t y = 0; y < p.height; ++y) {
      float* row = dst + (y + p.pad_h) * p.row_stride;
      float* even = row + even_phase * p.phase_w;
      float* odd = row + (1 - even_phase) * p.phase_w;
      const float* s = src + y * width;
      if (kPadding) {
        fill_zero(even, even_begin);
        fill_zero(even + even_begin + even_count,
                  p.phase_w - even_begin - even_count);
        fill_zero(odd, odd_begin);
        fill_zero(odd + odd_begin + odd_count,
                  p.phase_w - odd_begin - odd_count);
      }
      even += even_begin;
      odd += odd_begin;
      for (int64_t j = 0; j < odd_count; ++j) {
        even[j] = s[2 * j];
        odd[j] = s[2 * j + 1];
      }
      if (even_count > odd_count) even[odd_count] = s[width - 1];
    }
    return;
  }
  // Phase q contains the padded columns q, q + stride_w, ..., which are the
  // input columns x = q - pad_w + j * stride_w with x >= 0: count of them
  // from column first, stored from position begin of the phase.
  for (int64_t q = 0; q < p.stride_w; ++q) {
    const int64_t first =
        ((q - p.pad_w) % p.stride_w + p.stride_w) % p.stride_w;
    const int64_t begin = (first + p.pad_w) / p.stride_w;
    const int64_t count =
        first < width ? (width - first + p.stride_w - 1) / p.stride_w : 0;
    for (int64_t y = 0; y < p.height; ++y) {
      float* phase = dst + (y + p.pad_h) * p.row_stride + q * p.phase_w;
      const float* src_first = src + y * width + first;
      if (kPadding) fill_zero(phase, begin);
      for (int64_t j = 0; j < count; ++j) {
        phase[begin + j] = src_first[j * p.stride_w];
      }
      if (kPadding) {
        fill_zero(phase + begin + count, p.phase_w - begin - count);
      }
    }
  }
}

template <class Ops>
void prepare_plane(const PlaneLayout& p, const float* src, float* dst) {
  copy_plane<Ops, true>(p, src, dst);
}

template <class Ops>
void depthwise(const DepthwiseArgs& raw) {
  if (raw.padding_ready) {
    copy_plane<Ops, false>(*raw.layout, raw.input, raw.prepared);
  } else {
    copy_plane<Ops, true>(*raw.layout, raw.input, raw.prepared);
  }
  DepthwiseArgs args = raw;
  args.input = raw.prepared;
  with_activation(args.activation, [&](auto act) {
    if (args.indices != nullptr) {
      depthwise_body<Ops, true, decltype(act)::value>(args);
    } else {
      depthwise_body<Ops, false, decltype(act)::value>(args);
    }
  });
}
