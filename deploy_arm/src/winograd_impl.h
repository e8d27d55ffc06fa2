// Winograd F(4x4, 3x3) kernel templates shared by every instruction set.
//
// Included after kernel_impl.h by the per-ISA sources, with the same Ops.
// A 3x3 stride-1 conv computes each 4x4 output tile from a 6x6 input
// tile as Y = A^T [U . V] A, with V = B^T d B the transformed input tile,
// U = G g G^T the transformed filter (computed once at layer creation) and
// "." an elementwise product summed over input channels. The sums over
// input channels are 36 independent matrix products, one per position of
// the 6x6 tile, which is where the time goes: 36 multiply-adds per 16
// outputs and input channel instead of 144.
//
// Tile t of the layer is (t / tiles_x, t % tiles_x), and the vectors hold
// consecutive tiles. Tiles are grouped in blocks of block_tiles (the
// products' register blocking); the lanes past the last tile hold zeros
// and are never stored.
//
// The transforms use separate multiplies and adds in a fixed order and the
// products use fused(), so every instruction set gives bit-identical
// results, as with the other kernels.

// r = B^T d for one column (or row) of six values.
template <class Ops>
inline void winograd_input_1d(const typename Ops::Vec d[6],
                              typename Ops::Vec r[6]) {
  using Vec = typename Ops::Vec;
  const Vec four = Ops::set1(4.0f);
  const Vec five = Ops::set1(5.0f);
  const Vec two = Ops::set1(2.0f);
  r[0] = Ops::add(Ops::sub(Ops::mul(four, d[0]), Ops::mul(five, d[2])), d[4]);
  const Vec p = Ops::sub(d[4], Ops::mul(four, d[2]));
  const Vec q = Ops::sub(d[3], Ops::mul(four, d[1]));
  r[1] = Ops::add(p, q);
  r[2] = Ops::sub(p, q);
  const Vec p2 = Ops::sub(d[4], d[2]);
  const Vec q2 = Ops::mul(two, Ops::sub(d[3], d[1]));
  r[3] = Ops::add(p2, q2);
  r[4] = Ops::sub(p2, q2);
  r[5] = Ops::add(Ops::sub(Ops::mul(four, d[1]), Ops::mul(five, d[3])), d[5]);
}

// r = A^T m for one column (or row) of six values: four outputs.
template <class Ops>
inline void winograd_output_1d(const typename Ops::Vec m[6],
                               typename Ops::Vec r[4]) {
  using Vec = typename Ops::Vec;
  const Vec a = Ops::add(m[1], m[2]);
  const Vec b = Ops::sub(m[1], m[2]);
  const Vec c = Ops::add(m[3], m[4]);
  const Vec d = Ops::sub(m[3], m[4]);
  r[0] = Ops::add(Ops::add(m[0], a), c);
  r[1] = Ops::add(b, Ops::mul(Ops::set1(2.0f), d));
  r[2] = Ops::add(a, Ops::mul(Ops::set1(4.0f), c));
  r[3] = Ops::add(Ops::add(b, Ops::mul(Ops::set1(8.0f), d)), m[5]);
}

// Transforms every tile of input channel c into args.v. scratch has room
// for (4 * tiles_y + 2) * 4 * phase_w floats: the channel's zero-padded
// rows, each split into 4 phases by column modulo 4. So column 4 * tx + j
// of consecutive tiles tx is a run of consecutive floats. phase_w is
// tiles_x + kLanes, so the loads of a row's last vector stay in the row.
template <class Ops>
void winograd_input(const WinogradArgs& args, int64_t c, float* scratch) {
  using Vec = typename Ops::Vec;
  const int64_t rows = 4 * args.tiles_y + 2;
  const int64_t phase_w = args.phase_w;
  const int64_t row_stride = 4 * phase_w;
  const float* src = args.input + c * args.in_plane;
  const int64_t y_end = std::min(args.height, rows - args.pad_h);
  const int64_t x_end = std::min(args.width, row_stride - args.pad_w);
  // Zeros go only where no input lands: the rows above and below the
  // input and, per phase q of an input row, the positions before the
  // first and after the last input column x with (x + pad_w) % 4 == q.
  std::fill(scratch, scratch + args.pad_h * row_stride, 0.0f);
  std::fill(scratch + (args.pad_h + y_end) * row_stride,
            scratch + rows * row_stride, 0.0f);
  // Phase position j contains padded column 4 * j + q, input column
  // 4 * j + q - pad_w, for j in [j_begin[q], j_end[q]).
  int64_t j_begin[4], j_end[4];
  for (int64_t q = 0; q < 4; ++q) {
    j_begin[q] = (args.pad_w - q + 3) / 4;
    j_end[q] = std::max(j_begin[q], (args.pad_w + x_end - q + 3) / 4);
  }
  constexpr int64_t kChunk = 4 * Ops::kLanes;
  for (int64_t y = 0; y < y_end; ++y) {
    float* row = scratch + (y + args.pad_h) * row_stride;
    const float* src_row = src + y * args.width;
    for (int64_t q = 0; q < 4; ++q) {
      float* phase = row + q * phase_w;
      for (int64_t j = 0; j < j_begin[q]; ++j) phase[j] = 0.0f;
      for (int64_t j = j_end[q]; j < phase_w; ++j) phase[j] = 0.0f;
    }
    // Input column x goes to padded column x + pad_w. Chunks of kChunk
    // columns are split by column modulo 4 in registers, the last one
    // overlapping the one before it. Rows narrower than a chunk go column
    // by column. With four strided copies per row, one per phase, a 3x3
    // conv from 64 to 9 channels at 52 x 52 took 0.36 against 0.34 ms
    // (one thread, AVX2).
    if (x_end < kChunk) {
      for (int64_t x = 0; x < x_end; ++x) {
        const int64_t padded = x + args.pad_w;
        row[(padded & 3) * phase_w + (padded >> 2)] = src_row[x];
      }
      continue;
    }
    for (int64_t x0 = 0;; x0 += kChunk) {
      if (x0 + kChunk > x_end) x0 = x_end - kChunk;
      Vec phases[4];
      Ops::deinterleave4(src_row + x0, phases);
      for (int64_t q = 0; q < 4; ++q) {
        const int64_t padded = x0 + q + args.pad_w;
        Ops::store(row + (padded & 3) * phase_w + (padded >> 2), phases[q],
                   Ops::kLanes);
      }
      if (x0 + kChunk >= x_end) break;
    }
  }

  const int64_t nb = args.block_tiles;
  // A local copy: the stores below could alias args, so GCC reloaded
  // args.in_channels for each of them.
  const int64_t position_stride = args.in_channels * nb;
  const int64_t block_stride = 36 * position_stride;
  const int64_t tiles = args.tiles_y * args.tiles_x;
  for (int64_t first = 0; first < tiles; first += Ops::kLanes) {
    const int64_t ty = first / args.tiles_x;
    const int64_t tx = first % args.tiles_x;
    // A vector whose tiles lie in one tile row reads runs of consecutive
    // floats. One that wraps to the next row takes its first `split` lanes
    // from a run in this row and the rest from a run in the next. Lanes
    // past the last tile are zero. Vectors over three rows or more are
    // gathered lane by lane.
    const int valid =
        static_cast<int>(std::min<int64_t>(Ops::kLanes, tiles - first));
    const bool one_row = tx + valid <= args.tiles_x;
    const bool two_rows = !one_row && tx + valid <= 2 * args.tiles_x;
    const int split = static_cast<int>(args.tiles_x - tx);
    alignas(64) float gathered[6][6][Ops::kLanes];
    if (!one_row && !two_rows) {
      for (int l = 0; l < Ops::kLanes; ++l) {
        const int64_t t = first + l;
        if (t >= tiles) {
          for (int i = 0; i < 6; ++i) {
            for (int j = 0; j < 6; ++j) gathered[i][j][l] = 0.0f;
          }
          continue;
        }
        const float* tile =
            scratch + 4 * (t / args.tiles_x) * row_stride + t % args.tiles_x;
        for (int i = 0; i < 6; ++i) {
          for (int j = 0; j < 6; ++j) {
            gathered[i][j][l] =
                tile[i * row_stride + (j & 3) * phase_w + (j >> 2)];
          }
        }
      }
    }
    const float* tile_rows = scratch + 4 * ty * row_stride;

    Vec t[6][6];  // B^T d: rows transformed, by column
    for (int j = 0; j < 6; ++j) {
      Vec d[6];
      const float* column = tile_rows + (j & 3) * phase_w + tx + (j >> 2);
      for (int i = 0; i < 6; ++i) {
        if (one_row) {
          d[i] = Ops::load(column + i * row_stride);
        } else if (two_rows) {
          // Lane l >= split is tile l - split of the next tile row.
          const float* next = column + (4 + i) * row_stride - args.tiles_x;
          d[i] = Ops::select_first(Ops::load(column + i * row_stride),
                                   Ops::load(next), split);
        } else {
          d[i] = Ops::load(gathered[i][j]);
        }
        if (valid < Ops::kLanes && (one_row || two_rows)) {
          d[i] = Ops::select_first(d[i], Ops::zero(), valid);
        }
      }
      Vec r[6];
      winograd_input_1d<Ops>(d, r);
      for (int i = 0; i < 6; ++i) t[i][j] = r[i];
    }
    float* dst = args.v + (first / nb) * block_stride + c * nb + first % nb;
    for (int i = 0; i < 6; ++i) {
      Vec r[6];
      winograd_input_1d<Ops>(t[i], r);
      for (int j = 0; j < 6; ++j) {
        Ops::store(dst + (i * 6 + j) * position_stride, r[j], Ops::kLanes);
      }
    }
  }
}

// Computes the output tiles of the blocks [block_begin, block_end) for the
// output-channel blocks [ob_begin, ob_end). The 36 products run one
// position xi at a time over all blocks and channels of the call. So the
// filters of the channel chunk and the inputs of the block range stay in
// cache while one position is done, and each is read once per call.
// scratch has room for 36 * (block_end - block_begin) *
// (ob_end - ob_begin) * kOutBlock * block_tiles floats of products.
template <class Ops, int kTile, int kOutBlock>
void winograd_block(const WinogradArgs& args, int64_t block_begin,
                    int64_t block_end, int64_t ob_begin, int64_t ob_end,
                    float* scratch) {
  using Vec = typename Ops::Vec;
  constexpr int64_t nb = kTile * Ops::kLanes;
  const int64_t channels = args.in_channels;
  const int64_t blocks = block_end - block_begin;
  const int64_t chunk_channels = (ob_end - ob_begin) * kOutBlock;
  // Products of block b, position xi, local channel k at
  // scratch + ((b * 36 + xi) * chunk_channels + k) * nb, so the output
  // transform of one block reads one contiguous region.
  for (int xi = 0; xi < 36; ++xi) {
    const float* u_xi = args.u + xi * args.out_blocks * channels * kOutBlock;
    for (int64_t b = 0; b < blocks; ++b) {
      const float* v =
          args.v + ((block_begin + b) * 36 + xi) * channels * nb;
      for (int64_t ob = ob_begin; ob < ob_end; ++ob) {
        Vec acc[kOutBlock][kTile];
        for (int j = 0; j < kOutBlock; ++j) {
          for (int s = 0; s < kTile; ++s) acc[j][s] = Ops::zero();
        }
        const float* u = u_xi + ob * channels * kOutBlock;
        for (int64_t c = 0; c < channels; ++c) {
          Vec x[kTile];
          for (int s = 0; s < kTile; ++s) {
            x[s] = Ops::load(v + c * nb + s * Ops::kLanes);
          }
          for (int j = 0; j < kOutBlock; ++j) {
            const Vec w = Ops::set1(u[c * kOutBlock + j]);
            for (int s = 0; s < kTile; ++s) {
              acc[j][s] = Ops::fused(w, x[s], acc[j][s]);
            }
          }
        }
        float* m = scratch + ((b * 36 + xi) * chunk_channels +
                              (ob - ob_begin) * kOutBlock) * nb;
        for (int j = 0; j < kOutBlock; ++j) {
          for (int s = 0; s < kTile; ++s) {
            Ops::store(m + j * nb + s * Ops::kLanes, acc[j][s], Ops::kLanes);
          }
        }
      }
    }
  }

  const int64_t out_plane = args.out_plane;
  const int64_t tiles = args.tiles_y * args.tiles_x;
  const bool scaled = args.scale != nullptr;
  for (int64_t b = 0; b < blocks; ++b) {
    // Output position of each tile of the block: the top-left pixel and
    // how many rows and columns of its 4x4 lie inside the output.
    int64_t origin[nb];
    int rows[nb];
    int cols[nb];
    for (int64_t l = 0; l < nb; ++l) {
      const int64_t t = (block_begin + b) * nb + l;
      const int64_t oy = 4 * (t / args.tiles_x);
      const int64_t ox = 4 * (t % args.tiles_x);
      origin[l] = oy * args.out_w + ox;
      rows[l] = t < tiles ? static_cast<int>(std::min<int64_t>(4, args.out_h - oy))
                          : 0;
      cols[l] = static_cast<int>(std::min<int64_t>(4, args.out_w - ox));
    }
    // Vectors whose tiles all lie wholly inside the output.
    bool whole[kTile];
    for (int s = 0; s < kTile; ++s) {
      whole[s] = true;
      for (int l = 0; l < Ops::kLanes; ++l) {
        const int64_t lane = s * Ops::kLanes + l;
        whole[s] = whole[s] && rows[lane] == 4 && cols[lane] == 4;
      }
    }
    for (int64_t local = 0; local < chunk_channels; ++local) {
      const int64_t o = ob_begin * kOutBlock + local;
      if (o >= args.out_channels) break;
      const Vec bias = Ops::set1(args.bias[o]);
      const Vec scale = Ops::set1(scaled ? args.scale[o] : 1.0f);
      float* out = args.output + o * out_plane;
      for (int s = 0; s < kTile; ++s) {
        if (rows[s * Ops::kLanes] == 0) break;
        Vec t[4][6];  // A^T m: rows transformed, by column
        for (int j = 0; j < 6; ++j) {
          Vec m[6];
          for (int i = 0; i < 6; ++i) {
            m[i] = Ops::load(
                scratch +
                ((b * 36 + i * 6 + j) * chunk_channels + local) * nb +
                s * Ops::kLanes);
          }
          Vec r[4];
          winograd_output_1d<Ops>(m, r);
          for (int i = 0; i < 4; ++i) t[i][j] = r[i];
        }
        float y[4][4][Ops::kLanes];
        for (int i = 0; i < 4; ++i) {
          Vec r[4];
          winograd_output_1d<Ops>(t[i], r);
          for (int j = 0; j < 4; ++j) {
            const Vec value = scaled ? Ops::fused(r[j], scale, bias)
                                     : Ops::add(r[j], bias);
            r[j] = activate<Ops>(value, args.activation);
          }
          if (whole[s]) {
            // Each tile's 4 values of row i go to the output with one
            // store. One by one, a 3x3 conv from 64 to 64 channels at 52
            // x 52 took 0.82-0.85 against 0.80 ms (one thread, AVX2).
            float* dst[Ops::kLanes];
            for (int l = 0; l < Ops::kLanes; ++l) {
              dst[l] = out + origin[s * Ops::kLanes + l] + i * args.out_w;
            }
            Ops::store_columns4(r, dst);
            continue;
          }
          for (int j = 0; j < 4; ++j) Ops::store(y[i][j], r[j], Ops::kLanes);
        }
        if (whole[s]) continue;
        for (int l = 0; l < Ops::kLanes; ++l) {
          const int64_t lane = s * Ops::kLanes + l;
          for (int i = 0; i < rows[lane]; ++i) {
            float* dst = out + origin[lane] + i * args.out_w;
            for (int j = 0; j < cols[lane]; ++j) dst[j] = y[i][j][l];
          }
        }
      }
    }
  }
}
