"""White-box tests of datastore.snapshot: the .dir and index table a clean
close writes, which the next open trusts only if the header does. A snapshot
the header trusts but that makes no sense (edited, then made to match) is
refused as damage, never loaded; one damaged since (no longer matching) is
left for a scan, as test_datastore.py shows.
"""

import base64
import struct
import zlib
from pathlib import Path

import pytest

from datastore import CorruptStoreError, DataStore
from datastore import format as fmt
from tests.support import make_store


def rewrite_trusted_dir(path, edit):
    """Change .dir, then make the header trust it (size and CRC recomputed)."""
    text = edit(Path(f"{path}.dir").read_bytes())
    Path(f"{path}.dir").write_bytes(text)
    dat = bytearray(Path(f"{path}.dat").read_bytes())
    fields = list(fmt._HEADER.unpack_from(dat))
    fields[3:5] = [len(text), zlib.crc32(text)]
    header = fmt._HEADER.pack(*fields[:-1], 0)
    dat[:fmt._HEADER.size] = header[:-4] + zlib.crc32(header[:-4]).to_bytes(4, "little")
    Path(f"{path}.dat").write_bytes(bytes(dat))


@pytest.mark.parametrize("edit", [
    pytest.param(lambda t: t.replace(b"(512,", b"(" + b"9" * 5000 + b",", 1), id="huge-offset"),
    pytest.param(lambda t: t.replace(b"'k1'", b"'k0'", 1), id="duplicate-key"),
    pytest.param(lambda t: t.replace(b"'k1'", b"'" + b"x" * 33 + b"'", 1), id="key-too-long"),
    pytest.param(lambda t: t.replace(b"'k1'", b"'\\xff'", 1), id="key-not-utf8"),
    pytest.param(lambda t: t.replace(b"'k1'", b"''", 1), id="empty-key"),
    pytest.param(lambda t: t.replace(b"'k1'", b"b'k1'", 1), id="bytes-literal"),
    pytest.param(lambda t: t.replace(b"'k1'", b"1e999", 1), id="number-key"),
    pytest.param(lambda t: t.replace(b"'k1'", b"'" + b"(" * 5000 + b"'", 1), id="parens"),
    pytest.param(lambda t: t + b"garbage\n", id="a-line-of-garbage"),
    pytest.param(lambda t: t[:-1], id="no-last-newline"),
])
def test_a_trusted_index_that_makes_no_sense_is_corrupt_store_error(path, edit):
    make_store(path, 3)
    rewrite_trusted_dir(path, edit)
    with pytest.raises(CorruptStoreError, match="store.d.. is damaged"):
        DataStore(path)


def rewrite_trusted_table(path, edit):
    """Change the index table's numbers, then make it and the header match."""
    dat = bytearray(Path(f"{path}.dat").read_bytes())
    fields = list(fmt._HEADER.unpack_from(dat))
    pos, size = fields[5], fields[6]
    body = base64.b64decode(dat[pos + 32:pos + size])
    counts = fmt._TABLE_COUNTS.unpack_from(body)
    n, t = counts
    arrays = [list(struct.unpack_from(f"<{n}I", body, 8)),
              list(struct.unpack_from(f"<{n}H", body, 8 + 4 * n)),
              list(struct.unpack_from(f"<{t}I", body, 8 + 6 * n)),
              list(struct.unpack_from(f"<{t}Q", body, 8 + 6 * n + 4 * t))]
    n, t = edit(arrays, n, t)
    raw = (fmt._TABLE_COUNTS.pack(n, t) + struct.pack(f"<{len(arrays[0])}I", *arrays[0])
           + struct.pack(f"<{len(arrays[1])}H", *arrays[1])
           + struct.pack(f"<{len(arrays[2])}I", *arrays[2])
           + struct.pack(f"<{len(arrays[3])}Q", *arrays[3]))
    body = base64.b64encode(raw)
    record = fmt._pack_marker(fmt._TABLE, len(body), body, 1)
    dat[pos:pos + len(record)] = record
    fields[6] = len(record)
    header = fmt._HEADER.pack(*fields[:-1], 0)
    dat[:fmt._HEADER.size] = header[:-4] + zlib.crc32(header[:-4]).to_bytes(4, "little")
    Path(f"{path}.dat").write_bytes(bytes(dat))


def table_edit(change):
    def edit(arrays, n, t):
        change(arrays)
        return n, t
    return edit


@pytest.mark.parametrize("edit", [
    pytest.param(table_edit(lambda a: a[0].__setitem__(0, 0)), id="block-0"),
    pytest.param(table_edit(lambda a: a[0].__setitem__(0, 10 ** 6)), id="block-past-the-end"),
    pytest.param(table_edit(lambda a: a[1].__setitem__(0, 5)), id="size-too-small"),
    pytest.param(table_edit(lambda a: a[1].__setitem__(0, 60000)), id="size-too-large"),
    pytest.param(table_edit(lambda a: a[0].__setitem__(1, a[0][0])), id="records-overlap"),
    pytest.param(table_edit(lambda a: a[2].__setitem__(0, 99)), id="ttl-line-past-the-end"),
    pytest.param(table_edit(lambda a: a[2].__setitem__(1, a[2][0])), id="ttl-line-twice"),
    pytest.param(table_edit(lambda a: a[3].__setitem__(0, 0)), id="expiry-zero"),
    pytest.param(table_edit(lambda a: a[3].__setitem__(0, 2 ** 63)), id="expiry-past-9999"),
    pytest.param(lambda a, n, t: (a[0].pop(), a[1].pop(), (n - 1, t))[2], id="fewer-than-dir"),
])
def test_a_trusted_index_table_that_makes_no_sense_is_corrupt_store_error(path, edit):
    with DataStore(path) as s:
        for i in range(3):
            s.create(f"k{i}", {"i": i}, ttl=3600)
    rewrite_trusted_table(path, edit)
    with pytest.raises(CorruptStoreError, match="store.d.. is damaged"):
        DataStore(path)
