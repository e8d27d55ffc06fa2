"""The packed file's container: header, section table and aligned sections.

The byte layout is specified in docs/packed-format.md. This module reads
and writes tagged, checksummed sections and has no notion of detectors.
It imports only the standard library so that any tool can read a file.
"""
import os
import struct
import tempfile
import zlib
from dataclasses import dataclass
from typing import List, Sequence, Tuple

MAGIC = b'DGMSPACK'
VERSION_MAJOR = 1
VERSION_MINOR = 0
ALIGNMENT = 64
HEADER_SIZE = 64
SECTION_ENTRY_SIZE = 32
# Far above any real model (R50 RetinaNet has a few hundred sections); a
# larger count means a corrupt header, not a model.
MAX_SECTIONS = 1 << 20

# magic, major, minor, header size, file size, section count, alignment,
# section table offset, section table CRC-32, header CRC-32.
_HEADER = struct.Struct('<8sHHIQIIQII')
# tag, flags, offset, size, CRC-32, reserved.
_ENTRY = struct.Struct('<4sIQQII')


class PackedFormatError(ValueError):
    """A packed file that is malformed, corrupt or from a newer version."""


@dataclass
class Section:
    """One section: a 4-character ASCII tag and its bytes."""
    tag: str
    data: bytes


def align(offset: int, alignment: int = ALIGNMENT) -> int:
    """Return ``offset`` rounded up to a multiple of ``alignment``."""
    return (offset + alignment - 1) // alignment * alignment


def crc32(data) -> int:
    return zlib.crc32(data) & 0xFFFFFFFF


def _check_tag(tag: str) -> bytes:
    raw = tag.encode('ascii')
    if len(raw) != 4:
        raise ValueError(f'a section tag has 4 ASCII characters, got {tag!r}')
    return raw


def encode_container(sections: Sequence[Section]) -> bytes:
    """Return the complete file contents for ``sections``, in order."""
    if len(sections) > MAX_SECTIONS:
        raise ValueError(f'{len(sections)} sections exceed the format limit '
                         f'of {MAX_SECTIONS}')
    table_offset = HEADER_SIZE
    offset = align(table_offset + SECTION_ENTRY_SIZE * len(sections))
    entries = []
    layout: List[Tuple[int, bytes]] = []
    for section in sections:
        entries.append(
            _ENTRY.pack(_check_tag(section.tag), 0, offset, len(section.data),
                        crc32(section.data), 0))
        layout.append((offset, section.data))
        offset = align(offset + len(section.data))
    # The file ends right after the last section, without tail padding.
    file_size = (layout[-1][0] + len(layout[-1][1])) if layout else align(
        table_offset + SECTION_ENTRY_SIZE * len(sections))

    table = b''.join(entries)
    header = bytearray(HEADER_SIZE)
    _HEADER.pack_into(header, 0, MAGIC, VERSION_MAJOR, VERSION_MINOR,
                      HEADER_SIZE, file_size, len(sections), ALIGNMENT,
                      table_offset, crc32(table), 0)
    struct.pack_into('<I', header, 44, crc32(bytes(header)))

    out = bytearray(file_size)
    out[:HEADER_SIZE] = header
    out[table_offset:table_offset + len(table)] = table
    for start, data in layout:
        out[start:start + len(data)] = data
    return bytes(out)


def decode_container(buffer, source: str = 'packed file') -> List[Section]:
    """Parse and verify a whole file; return its sections in file order.

    Raises:
        PackedFormatError: on a wrong magic, a newer major version, a size
            or offset outside the file, misalignment, or a CRC-32 mismatch.
            The message names the part that is wrong.
    """
    view = memoryview(buffer)
    size = len(view)
    if size < HEADER_SIZE:
        raise PackedFormatError(
            f'{source} is truncated: {size} bytes, shorter than the '
            f'{HEADER_SIZE}-byte header')
    (magic, major, minor, header_size, file_size, count, alignment,
     table_offset, table_crc, header_crc) = _HEADER.unpack_from(view, 0)
    if magic != MAGIC:
        raise PackedFormatError(
            f'{source} is not a packed DGMS model: its magic is {magic!r}, '
            f'expected {MAGIC!r}. Create one with tools/pack.py')
    if major > VERSION_MAJOR:
        raise PackedFormatError(
            f'{source} has format version {major}.{minor}, newer than the '
            f'{VERSION_MAJOR}.{VERSION_MINOR} this reader supports; update '
            'mmdgms to read it')
    if major < 1:
        raise PackedFormatError(f'{source} has an invalid format version '
                                f'{major}.{minor}')
    header = bytearray(view[:HEADER_SIZE])
    struct.pack_into('<I', header, 44, 0)
    if crc32(bytes(header)) != header_crc:
        raise PackedFormatError(
            f'{source} has a corrupt header (CRC-32 mismatch)')
    if header_size != HEADER_SIZE or alignment != ALIGNMENT:
        raise PackedFormatError(
            f'{source} has header size {header_size} and alignment '
            f'{alignment}; version {major}.{minor} requires {HEADER_SIZE} '
            f'and {ALIGNMENT}')
    if file_size != size:
        raise PackedFormatError(
            f'{source} is {size} bytes but its header records {file_size}: '
            'the file is truncated or has trailing data (an incomplete copy '
            'or download?)')
    if count > MAX_SECTIONS:
        raise PackedFormatError(
            f'{source} declares {count} sections, more than the limit '
            f'{MAX_SECTIONS}')
    table_end = table_offset + SECTION_ENTRY_SIZE * count
    if table_offset < HEADER_SIZE or table_end > size:
        raise PackedFormatError(
            f'{source} has its section table at bytes {table_offset}-'
            f'{table_end}, outside the {size}-byte file')
    table = view[table_offset:table_end]
    if crc32(table) != table_crc:
        raise PackedFormatError(
            f'{source} has a corrupt section table (CRC-32 mismatch)')

    sections = []
    previous_end = table_end
    for index in range(count):
        raw_tag, _, offset, length, section_crc, _ = _ENTRY.unpack_from(
            table, index * SECTION_ENTRY_SIZE)
        try:
            tag = raw_tag.decode('ascii')
        except UnicodeDecodeError:
            tag = repr(raw_tag)
        where = f'section {index} ({tag})'
        if offset % ALIGNMENT:
            raise PackedFormatError(
                f'{source}: {where} starts at byte {offset}, which is not '
                f'a multiple of {ALIGNMENT}')
        if offset < previous_end or offset + length > size:
            raise PackedFormatError(
                f'{source}: {where} spans bytes {offset}-{offset + length}, '
                f'which overlaps another part or lies outside the '
                f'{size}-byte file')
        _check_padding(view, previous_end, offset, source)
        data = view[offset:offset + length]
        if crc32(data) != section_crc:
            raise PackedFormatError(
                f'{source}: {where} is corrupt (CRC-32 mismatch)')
        sections.append(Section(tag, bytes(data)))
        previous_end = offset + length
    _check_padding(view, previous_end, size, source)
    return sections


def _check_padding(view, start: int, end: int, source: str) -> None:
    # Alignment padding is outside every checksum, so it must be zero: then
    # any changed byte anywhere in the file is detected.
    if any(view[start:end]):
        raise PackedFormatError(
            f'{source} has non-zero bytes in the alignment padding at bytes '
            f'{start}-{end}: the file is corrupt')


def write_atomic(path: str, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same
    folder, so ``path`` is either absent or complete, even after a crash or
    Ctrl-C (an existing file is replaced only by a complete one)."""
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise FileNotFoundError(
            f'cannot write {path}: the folder {folder} does not exist')
    fd, tmp_path = tempfile.mkstemp(prefix='.' + os.path.basename(path) + '.',
                                    suffix='.tmp', dir=folder)
    try:
        # mkstemp creates the file readable by its owner only; give it the
        # permissions that open() would, under the process umask.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp_path, 0o666 & ~umask)
        with os.fdopen(fd, 'wb') as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp_path, path)
    except BaseException:
        try:
            os.unlink(tmp_path)
        except FileNotFoundError:
            pass
        raise
