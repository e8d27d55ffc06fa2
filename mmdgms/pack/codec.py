"""Index stream codecs: dense bit packing and interleaved rANS.

Both are specified byte for byte in docs/packed-format.md. Only numpy is
needed, so readers in other tools can reuse this module.
"""
import struct

import numpy as np

from .container import PackedFormatError

# rANS parameters: a 32-bit state kept in [2**16, 2**32), renormalised by
# whole 16-bit words, and symbol frequencies quantised to sum to 2**16.
# With these the encoder emits at most one word per symbol and the decoder
# reads at most one.
RANS_PRECISION = 16
RANS_TOTAL = 1 << RANS_PRECISION
RANS_LOW = 1 << 16
RANS_MAX_LANES = 4096
RANS_BYTES_PER_LANE = 2048
RANS_MAX_STEPS = 4096
_RANS_HEADER = struct.Struct('<IIII')


def packed_size(count: int, bits: int) -> int:
    """Return the bytes that ``count`` indices take at ``bits`` bits."""
    return (count * bits + 7) // 8


def pack_bits(indices: np.ndarray, bits: int) -> bytes:
    """Pack uint8 ``indices`` (each < 2**bits) LSB-first at ``bits`` bits.

    Index j occupies bits [j * bits, (j + 1) * bits) of the stream. Stream
    bit i is bit (i % 8) of byte i // 8, and unused bits of the last byte
    are 0.
    """
    flat = np.ascontiguousarray(indices, dtype=np.uint8).reshape(-1)
    if flat.size and int(flat.max()) >= 1 << bits:
        raise ValueError(f'index {int(flat.max())} does not fit in {bits} '
                         'bits')
    shifts = np.arange(bits, dtype=np.uint8)
    bit_matrix = (flat[:, None] >> shifts) & 1
    return np.packbits(bit_matrix.reshape(-1), bitorder='little').tobytes()


def unpack_bits(data: bytes, bits: int, count: int) -> np.ndarray:
    """Return ``count`` uint8 indices from a stream made by :func:`pack_bits`.

    Raises:
        PackedFormatError: when ``data`` is not exactly the packed size.
    """
    expected = packed_size(count, bits)
    if len(data) != expected:
        raise PackedFormatError(
            f'a {bits}-bit index stream of {count} indices takes {expected} '
            f'bytes, but {len(data)} are stored')
    raw = np.frombuffer(data, dtype=np.uint8)
    bit_matrix = np.unpackbits(raw, bitorder='little',
                               count=count * bits).reshape(count, bits)
    shifts = np.arange(bits, dtype=np.uint8)
    return (bit_matrix << shifts).sum(axis=1, dtype=np.uint8)


def empirical_entropy_bits(indices: np.ndarray, num_symbols: int) -> float:
    """Return the total empirical entropy of ``indices``, in bits: n times
    the Shannon entropy of their histogram (the bound for any coder that
    codes symbols independently with one static model)."""
    counts = np.bincount(indices.reshape(-1), minlength=num_symbols)
    total = counts.sum()
    if total == 0:
        return 0.0
    probs = counts[counts > 0] / total
    return float(-(counts[counts > 0] * np.log2(probs)).sum())


def quantize_frequencies(counts: np.ndarray) -> np.ndarray:
    """Scale symbol counts to frequencies summing to 2**16, every present
    symbol keeping a frequency of at least 1."""
    counts = counts.astype(np.int64)
    total = int(counts.sum())
    freqs = np.where(counts > 0,
                     np.maximum(1, np.round(counts * RANS_TOTAL / total)),
                     0).astype(np.int64)
    # Move the rounding error to the most frequent symbols, one unit each,
    # never taking a symbol below 1.
    error = RANS_TOTAL - int(freqs.sum())
    order = np.argsort(-freqs, kind='stable')
    position = 0
    while error != 0:
        symbol = order[position % len(order)]
        step = 1 if error > 0 else -1
        if freqs[symbol] + step >= 1 and counts[symbol] > 0:
            freqs[symbol] += step
            error -= step
        position += 1
    return freqs


def rans_lane_count(count: int, entropy_bits: float) -> int:
    """Return how many interleaved lanes to use: enough to vectorise the
    coder (at most RANS_MAX_STEPS steps), but few enough that the 4-byte
    final state of each lane stays below about 0.2% of the output."""
    by_size = int(entropy_bits / 8 / RANS_BYTES_PER_LANE)
    by_steps = -(-count // RANS_MAX_STEPS)
    return int(min(RANS_MAX_LANES, max(1, by_size, by_steps)))


def rans_encode(indices: np.ndarray, num_symbols: int) -> bytes:
    """Encode uint8 ``indices`` (each < num_symbols) with interleaved rANS.

    Symbol j goes to lane j % L. The word stream is ordered as the decoder
    reads it: by step, then by lane.
    """
    symbols = np.ascontiguousarray(indices, dtype=np.uint8).reshape(-1)
    count = symbols.size
    counts = np.bincount(symbols, minlength=num_symbols)
    if counts.size > num_symbols:
        raise ValueError(f'index {counts.size - 1} is outside a codebook of '
                         f'{num_symbols} entries')
    lanes = rans_lane_count(count, empirical_entropy_bits(symbols,
                                                          num_symbols))
    freqs = quantize_frequencies(counts) if count else np.zeros(
        num_symbols, np.int64)
    starts = np.concatenate([[0], np.cumsum(freqs)[:-1]]).astype(np.uint64)
    freqs_u = freqs.astype(np.uint64)

    steps = (count + lanes - 1) // lanes
    state = np.full(lanes, RANS_LOW, dtype=np.uint64)
    words = np.zeros((steps, lanes), dtype=np.uint16)
    emitted = np.zeros((steps, lanes), dtype=bool)
    for step in range(steps - 1, -1, -1):
        begin = step * lanes
        active = min(lanes, count - begin)
        row = symbols[begin:begin + active]
        x = state[:active]
        freq = freqs_u[row]
        emit = x >= (freq << np.uint64(16))
        words[step, :active] = np.where(emit, x & np.uint64(0xFFFF), 0)
        emitted[step, :active] = emit
        x = np.where(emit, x >> np.uint64(16), x)
        state[:active] = ((x // freq) << np.uint64(RANS_PRECISION)) + (
            x % freq) + starts[row]
    stream = words[emitted]

    header = _RANS_HEADER.pack(lanes, RANS_PRECISION, num_symbols,
                               stream.size)
    return b''.join([
        header,
        freqs.astype('<u4').tobytes(),
        state.astype('<u4').tobytes(),
        stream.astype('<u2').tobytes()
    ])


def rans_decode(data: bytes, num_symbols: int, count: int) -> np.ndarray:
    """Decode ``count`` indices from a stream made by :func:`rans_encode`.

    Raises:
        PackedFormatError: when the header, frequency table, states or
            word count are inconsistent, or the stream does not end where
            the encoder started it (every lane back at 2**16, every word
            read). This catches corruption even without the checksum.
    """
    if len(data) < _RANS_HEADER.size:
        raise PackedFormatError(
            f'an rANS stream needs a {_RANS_HEADER.size}-byte header, got '
            f'{len(data)} bytes')
    lanes, precision, table_size, word_count = _RANS_HEADER.unpack_from(data)
    max_lanes = min(RANS_MAX_LANES, max(count, 1))
    if not 1 <= lanes <= max_lanes or precision != RANS_PRECISION:
        raise PackedFormatError(
            f'an rANS stream of {count} indices must use 1 to {max_lanes} '
            f'lanes and {RANS_PRECISION}-bit frequencies, got {lanes} and '
            f'{precision}')
    if table_size != num_symbols:
        raise PackedFormatError(
            f'an rANS frequency table has {table_size} entries for a '
            f'codebook of {num_symbols}')
    expected = (_RANS_HEADER.size + 4 * table_size + 4 * lanes +
                2 * word_count)
    if len(data) != expected:
        raise PackedFormatError(
            f'an rANS stream with {lanes} lanes, {table_size} symbols and '
            f'{word_count} words takes {expected} bytes, but {len(data)} are '
            'stored')
    offset = _RANS_HEADER.size
    freqs = np.frombuffer(data, '<u4', table_size, offset).astype(np.uint64)
    offset += 4 * table_size
    state = np.frombuffer(data, '<u4', lanes, offset).astype(np.uint64)
    offset += 4 * lanes
    stream = np.frombuffer(data, '<u2', word_count, offset).astype(np.uint64)

    if count and int(freqs.sum()) != RANS_TOTAL:
        raise PackedFormatError(
            f'rANS frequencies sum to {int(freqs.sum())}, not {RANS_TOTAL}')
    if bool((state < RANS_LOW).any()):
        raise PackedFormatError('an rANS lane state is below 2**16')
    starts = np.concatenate([[0], np.cumsum(freqs)[:-1]]).astype(np.uint64)
    # slot_to_symbol maps every value of (x mod 2**16) to its symbol.
    slot_to_symbol = np.repeat(np.arange(table_size, dtype=np.uint8),
                               freqs.astype(np.int64)) if count else None

    out = np.empty(count, dtype=np.uint8)
    mask = np.uint64(RANS_TOTAL - 1)
    position = 0
    steps = (count + lanes - 1) // lanes
    for step in range(steps):
        begin = step * lanes
        active = min(lanes, count - begin)
        x = state[:active]
        slot = x & mask
        row = slot_to_symbol[slot.astype(np.int64)]
        out[begin:begin + active] = row
        x = freqs[row] * (x >> np.uint64(RANS_PRECISION)) + slot - starts[row]
        need = x < np.uint64(RANS_LOW)
        needed = int(need.sum())
        if position + needed > word_count:
            raise PackedFormatError(
                'an rANS stream ends before all indices are decoded')
        fill = np.zeros(active, dtype=np.uint64)
        fill[need] = stream[position:position + needed]
        position += needed
        state[:active] = np.where(need, (x << np.uint64(16)) | fill, x)
    if position != word_count or bool((state != RANS_LOW).any()):
        raise PackedFormatError(
            'an rANS stream does not decode to its recorded end state: the '
            'index data is corrupt')
    return out
