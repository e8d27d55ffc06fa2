// The kernel table of one instruction set, from its Ops and blocking.
// Included, after kernel_impl.h and winograd_impl.h, inside the anonymous
// namespace of each per-ISA source file.

template <class Ops, int kQuantTile, int kDenseTile, int kDenseOutBlock,
          int kDenseSingleTile>
KernelTable make_kernel_table(Isa isa) {
  return {
      isa,
      Ops::kLanes,
      kQuantTile,
      kDenseTile,
      kDenseOutBlock,
      kDenseTile > 1 ? kDenseTile - 1 : 0,
      kDenseSingleTile,
      &quant_tile<Ops, kQuantTile>,
      &dense_tile<Ops, kDenseTile, kDenseOutBlock>,
      &dense_tile<Ops, kDenseSingleTile, 1>,
      &lookup_tile<Ops, kDenseTile, kDenseOutBlock>,
      &lookup_tile<Ops, kDenseSingleTile, 1>,
      &chunk_tiles<Ops, kDenseTile, kDenseOutBlock, DenseKernelArgs>,
      &chunk_tiles<Ops, kDenseTile, kDenseOutBlock, LookupKernelArgs>,
      &prepare_plane<Ops>,
      &depthwise<Ops>,
      Ops::kLanes,
      kDenseTile * Ops::kLanes,
      kDenseOutBlock,
      &winograd_input<Ops>,
      &winograd_block<Ops, kDenseTile, kDenseOutBlock>,
  };
}
