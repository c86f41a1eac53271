"""The on-disk format: each structure described once, field by field, with
one function that packs it and one that checks and unpacks it.

A store named ``path`` is ``path.dat`` (the records: the truth),
``path.idx`` (the index: where each key's record is, see ``index``) and
``path.lock`` (for the inter-process lock, which holds no data). Version 2
kept a ``dbm.dumb``-readable ``path.dir`` instead of ``path.idx``; it cost
30 bytes a key and a write of every key at each close, and is gone:
``datastore export`` gives a store's content as JSON Lines.

``.dat`` is a sequence of 64-byte blocks. Block 0 holds the *header*
(``_HEADER``, little-endian, 48 bytes, within one disk sector)::

    magic "DataStr4"   8 bytes ("DataStr3", "DataStr2": versions 3 and 2,
                       converted at open, see legacy)
    state              1 byte: 0 closed cleanly, 1 open (or killed while open)
    (zero)             3 bytes
    sequence number    8 bytes: closed, the next one to issue; open, a bound
                       that every number issued while open stays below
    stamp              8 bytes: closed, a random number the clean close wrote
                       into .idx too (see snapshot); open, 0
    (zero)             16 bytes
    CRC-32             4 bytes, of the fields before it

Every other block is the first block of a *record*, a block inside one, or
free space. A record starts at a block boundary and describes itself with a
32-byte *head* (``_HEAD``, little-endian)::

    magic              4 bytes: 0xFF, then "DSr"
    kind               1 byte: 1 value, 2 free marker
    key length         1 byte: UTF-8 bytes of the key (0 for kind 2)
    (zero)             2 bytes
    sequence number    8 bytes: which of two copies of a key is newer
    expires_at         8 bytes: the bits of a float64 time.time() value,
                       0 for never (kind 2: 0)
    length             4 bytes: kind 1, bytes of the body; kind 2, blocks of
                       free space that start here
    CRC-32             4 bytes, of the head before it, the key and the body

* kind 1, a *value*: the key (UTF-8) and the body (the value as compact
  JSON, UTF-8) follow the head.
* kind 2, a *free marker*: nothing follows the head.

The magic starts with the byte 0xFF, which UTF-8 never contains: so nothing
a user stores, a key or a value, can look like a head at a block boundary,
however its bytes fall across blocks.

The engine describes a record by a *slot*, one int (see ``_slot``): record
size in bytes (16 bits) | block (32 bits) << 16 | expires_at bits << 48.
The index stores the low 48 bits, the *place*; the expiry is in the
record's head. The bits of non-negative floats order as the floats do, so
expiries compare directly as ints.
"""

from __future__ import annotations

import errno
import io
import os
import stat
import struct
import sys
import zlib
from typing import Optional, Tuple

from .codec import _LATEST_EXPIRY, MAX_KEY_LENGTH, MAX_VALUE_BYTES
from .errors import CorruptStoreError

# Records start at multiples of this many bytes (2 ** _BLOCK_BITS).
_BLOCK, _BLOCK_BITS = 64, 6
# A record's head, and the same without the CRC that covers it.
_HEAD = struct.Struct("<4sBBHQQII")
_FIELDS = struct.Struct("<4sBBHQQI")
_MAGIC = b"\xffDSr"
_VALUE, _FREE = 1, 2
_MAX_KEY_BYTES = 4 * MAX_KEY_LENGTH
_MAX_RECORD = _HEAD.size + _MAX_KEY_BYTES + MAX_VALUE_BYTES
_MAX_BLOCKS = -(-_MAX_RECORD // _BLOCK)  # 259
_MAX_SEQ = 1 << 62  # larger sequence numbers in a file are damage (they would overflow)
# The largest max_bytes: block numbers and free-marker lengths fit 32 bits.
_LARGEST_STORE = 1 << 38

_HEADER = struct.Struct("<8sB3xQQ16xI")
_HEADER_MAGICS = {b"DataStr4": 4, b"DataStr3": 3, b"DataStr2": 2}  # -> version
_HEADER_MAGIC = b"DataStr4"
_CLOSED, _OPEN = 0, 1
_LEASE = 1 << 20  # sequence numbers issued while open per write of the header's bound

# The index's slots (see the module docstring).
_SIZE_MASK = 0xFFFF
_BLOCK_SHIFT, _BLOCK_MASK = 16, 0xFFFFFFFF
_EXP_SHIFT = 48
_SLOT_MASK = (1 << _EXP_SHIFT) - 1  # size and block, without the expiry
_FLOAT = struct.Struct("<d")
_BITS = struct.Struct("<Q")
_LATEST_EXPIRY_BITS = struct.unpack("<Q", struct.pack("<d", _LATEST_EXPIRY))[0]


# --- Blocks, slots and expiries -------------------------------------------

def _blocks(size: int) -> int:
    """Blocks that `size` bytes take."""
    return -(-size // _BLOCK)


def _slot(size: int, block: int, exp: int = 0) -> int:
    return size | block << _BLOCK_SHIFT | exp << _EXP_SHIFT


def _slot_size(slot: int) -> int:
    return slot & _SIZE_MASK


def _slot_block(slot: int) -> int:
    return slot >> _BLOCK_SHIFT & _BLOCK_MASK


def _slot_exp(slot: int) -> int:
    """The expiry's float bits, 0 for never."""
    return slot >> _EXP_SHIFT


def _float_bits(value: float) -> int:
    return int(_BITS.unpack(_FLOAT.pack(value))[0])


def _bits_float(bits: int) -> float:
    return float(_FLOAT.unpack(_BITS.pack(bits))[0])


# --- Records --------------------------------------------------------------

def _pack_value(seq: int, key: bytes, exp: int, body: bytes) -> bytes:
    fields = _FIELDS.pack(_MAGIC, _VALUE, len(key), 0, seq, exp, len(body))
    crc = zlib.crc32(body, zlib.crc32(key, zlib.crc32(fields)))
    return b"".join((fields, crc.to_bytes(4, "little"), key, body))


def _free_marker(length: int) -> bytes:
    """A free marker of `length` blocks (packed once, for the lengths of a record)."""
    return _FREE_MARKERS[length] if length <= _MAX_BLOCKS else _pack_marker(length)


def _pack_marker(length: int) -> bytes:
    fields = _FIELDS.pack(_MAGIC, _FREE, 0, 0, 0, 0, length)
    return fields + zlib.crc32(fields).to_bytes(4, "little")


_FREE_MARKERS = tuple(_pack_marker(length) for length in range(_MAX_BLOCKS + 1))


# (kind, seq, key, expiry bits, length, total bytes): see _parse_item
_Item = Tuple[int, int, bytes, int, int, int]


def _parse_item(buf: bytes, off: int, magic: bytes = _MAGIC) -> Optional[_Item]:
    """The valid record or free marker at buf[off:], or None.

    Returns (kind, seq, key, expiry bits, length, total bytes). (The scan in
    recovery makes the same checks in bulk; a test holds the two to the same
    answers. Versions 2 and 3 wrote the same heads under another magic: see
    legacy.)
    """
    if len(buf) - off < _HEAD.size:
        return None
    found, kind, key_len, zero, seq, exp, length, crc = _HEAD.unpack_from(buf, off)
    if found != magic or zero or exp > _LATEST_EXPIRY_BITS or seq >= _MAX_SEQ:
        return None
    if kind == _VALUE:
        if not 0 < key_len <= _MAX_KEY_BYTES or length > MAX_VALUE_BYTES:
            return None
        total = _HEAD.size + key_len + length
    elif kind == _FREE and not key_len and length:
        total = _HEAD.size
    else:
        return None
    end = off + total
    if end > len(buf) or zlib.crc32(buf[off + _HEAD.size:end],
                                    zlib.crc32(buf[off:off + _HEAD.size - 4])) != crc:
        return None
    return kind, seq, buf[off + _HEAD.size:off + _HEAD.size + key_len], exp, length, total


def _with_seq(record: bytes, seq: int) -> bytes:
    """A copy of a valid value record with another sequence number."""
    fields = record[:8] + seq.to_bytes(8, "little") + record[16:_FIELDS.size]
    crc = zlib.crc32(record[_HEAD.size:], zlib.crc32(fields))
    return fields + crc.to_bytes(4, "little") + record[_HEAD.size:]


def _value_body(record: bytes, key: bytes) -> Optional[bytes]:
    """The body of `record` if it is a whole, valid value record of `key`."""
    item = _parse_item(record, 0)
    if item is None or item[0] != _VALUE or item[2] != key or item[5] != len(record):
        return None
    return record[_HEAD.size + len(key):]


def _valid_key(key: bytes) -> bool:
    try:
        return 1 <= len(key.decode("utf-8")) <= MAX_KEY_LENGTH
    except UnicodeDecodeError:
        return False


def _valid_keys(keys: list[bytes]) -> bool:
    """Whether every key is UTF-8 of 1 to MAX_KEY_LENGTH characters, checked
    in bulk: joined by newlines, which can neither end nor continue a UTF-8
    character, the keys decode if and only if each one does."""
    if not keys:
        return True
    if min(map(len, keys)) < 1:
        return False
    try:
        b"\n".join(keys).decode("utf-8")
    except UnicodeDecodeError:
        return False
    return max(map(len, keys)) <= MAX_KEY_LENGTH or all(
        _valid_key(key) for key in keys if len(key) > MAX_KEY_LENGTH)


# --- The header -----------------------------------------------------------

def _pack_header(state: int, seq: int, stamp: int = 0) -> bytes:
    fields = _HEADER.pack(_HEADER_MAGIC, state, seq, stamp, 0)
    return fields[:-4] + zlib.crc32(fields[:-4]).to_bytes(4, "little")


class _Header:
    """The fields of a valid header (of version 4, 3 or 2: see `version`)."""

    def __init__(self, data: bytes) -> None:
        magic, self.state, self.seq, self.stamp, _ = _HEADER.unpack(data)
        self.version = _HEADER_MAGICS[magic]

    @staticmethod
    def parse(data: bytes) -> Optional[_Header]:
        if (len(data) < _HEADER.size or data[:8] not in _HEADER_MAGICS
                or zlib.crc32(data[:_HEADER.size - 4])
                != int.from_bytes(data[_HEADER.size - 4:_HEADER.size], "little")):
            return None
        header = _Header(data[:_HEADER.size])
        return header if header.state in (_CLOSED, _OPEN) and header.seq < _MAX_SEQ else None


def _item_before(fd: int, end: int) -> Optional[tuple[int, bytes, _Item]]:
    """(block, buffer from that block on, _parse_item's fields) of the last
    valid item that starts within _MAX_BLOCKS blocks before block `end` of
    .dat, or None. (It may end before `end`: the caller checks.)"""
    if end <= 1:
        return None
    first, buf = end - 1, _read_at(fd, _BLOCK, (end - 1) * _BLOCK)
    item = _parse_item(buf, 0)  # most records take one block
    if item is None:
        first = max(1, end - _MAX_BLOCKS)
        buf = _read_at(fd, (end - first) * _BLOCK, first * _BLOCK)
        off = len(buf)
        while item is None and off > 0:
            off = buf.rfind(_MAGIC, 0, off)
            if off < 0:
                return None
            if off % _BLOCK == 0:  # else: the magic inside a value's text
                item = _parse_item(buf, off)
        buf, first = buf[off:], first + off // _BLOCK
    return None if item is None else (first, buf, item)


# --- Files ----------------------------------------------------------------

def _open_regular(path: str) -> io.FileIO:
    """A regular file (created, private, if missing) open for reading and
    writing, for the store's life. Anything else (a folder, a FIFO, a
    device) is refused before a byte is read. A file object, not a bare
    descriptor: if an interrupt comes between opening it and handing it
    over, it closes as it is dropped, and no lock stays behind."""
    try:
        _new_file(path, b"")
    except FileExistsError:
        pass
    try:
        file = io.FileIO(path, "r+")
    except IsADirectoryError:
        raise CorruptStoreError(f"{path} is a folder, not a store file; move it away",
                                path=path) from None
    if not stat.S_ISREG(os.fstat(file.fileno()).st_mode):
        file.close()
        raise CorruptStoreError(f"{path} is not a regular file; move it away", path=path)
    return file


def _new_file(path: str, data: bytes) -> None:
    """Make `path` (which must not exist), readable by its owner only,
    holding `data`, fsynced if there is any."""
    with io.FileIO(path, "x") as file:
        os.chmod(path, 0o600)
        if data:
            _write_at(file.fileno(), data, 0)
            _fsync(file.fileno())


def _create_data_file(path: str, idx_path: str) -> None:
    """Make `path` a new store's .dat, holding only a valid header, unless
    it exists already. The header is written under a temporary name and
    fsynced before the file takes its name, and the folder is fsynced after:
    so a power cut leaves either no .dat or one with a valid header, never
    an empty or torn one that the next open would refuse as foreign. An
    index file that holds anything says the .dat was lost, not never made:
    that is refused."""
    if os.path.exists(idx_path) and (not os.path.isfile(idx_path)
                                     or os.path.getsize(idx_path)):
        raise CorruptStoreError(f"{idx_path} exists but {path} is missing; restore "
                                "the data file or move the index away", path=idx_path)
    temp = f"{path}.{os.getpid()}.new"
    _remove(temp)  # of a creator that had this process's number before
    try:
        _new_file(temp, _pack_header(_CLOSED, 1))
        try:
            os.link(temp, path)  # never over a .dat another opener made meanwhile
        except FileExistsError:
            pass
        except OSError as exc:
            if exc.errno not in _NO_HARD_LINKS:
                raise
            try:
                _new_file(path, _pack_header(_CLOSED, 1))  # in place, then
            except FileExistsError:
                pass
    finally:
        _remove(temp)
    _fsync_folder(os.path.dirname(path))


# What os.link raises on a file system without hard links (FAT, some FUSE
# ones): then the new .dat is made in place instead, with O_EXCL.
_NO_HARD_LINKS = frozenset((errno.EPERM, errno.EOPNOTSUPP, errno.ENOSYS, errno.EMLINK))


def _fsync_folder(folder: str) -> None:
    """Make the names in `folder` durable (where folders can be opened)."""
    if sys.platform == "win32":
        return
    fd = os.open(folder or ".", os.O_RDONLY)
    try:
        _fsync(fd)
    finally:
        os.close(fd)


def _remove(*paths: str) -> None:
    for path in paths:
        try:
            os.remove(path)
        except FileNotFoundError:
            pass


def _write_at(fd: int, data: bytes, pos: int) -> None:
    """Write all of data at pos (seek and write where there is no pwrite)."""
    written = 0
    if hasattr(os, "pwrite"):
        written = os.pwrite(fd, data, pos)  # whole, nearly always
        if written == len(data):
            return
    view = memoryview(data)[written:]
    pos += written
    while view:
        if hasattr(os, "pwrite"):
            written = os.pwrite(fd, view, pos)
        else:  # Windows: the caller holds the store's lock, so no one moves the offset
            os.lseek(fd, pos, os.SEEK_SET)
            written = os.write(fd, view)
        view = view[written:]
        pos += written


def _read_at(fd: int, size: int, pos: int) -> bytes:
    """Read up to size bytes at pos: fewer only at the end of the file."""
    if hasattr(os, "pread"):
        data = os.pread(fd, size, pos)
    else:  # Windows: the caller holds the store's lock, so no one moves the offset
        os.lseek(fd, pos, os.SEEK_SET)
        data = os.read(fd, size)
    if 0 < len(data) < size:  # a short read, which a regular file rarely gives
        more = _read_at(fd, size - len(data), pos + len(data))
        data += more
    return data


def _fsync(fd: int) -> None:
    """Make fd's writes durable. On macOS, fsync only reaches the drive's
    cache; F_FULLFSYNC asks the drive to write it (where the file system
    supports it)."""
    if sys.platform == "darwin":
        import fcntl  # POSIX only, so imported where it is used
        try:
            fcntl.fcntl(fd, fcntl.F_FULLFSYNC)
            return
        except OSError:
            pass
    os.fsync(fd)
