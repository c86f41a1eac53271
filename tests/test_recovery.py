"""White-box tests of datastore.recovery: the scan of .dat after a crash (in
bulk, a chunk at a time, held to the rules for one record at a time), which
copy of a key wins, what the scan counts, and sequence numbers across reopen
and recovery. Crashes as a user meets them (kill -9, a damaged record or
index) are in test_datastore.py; the snapshot's checks are in test_format.py.
"""

import logging
import os
import random
import struct
import time
import zlib
from pathlib import Path

import pytest

from datastore import MAX_STORE_BYTES, MAX_VALUE_BYTES, DataStore, recovery
from datastore import format as fmt
from datastore.engine import _Engine
from tests.support import (
    abandon, assert_files_match_memory, counted_size, indexed, live_content,
)


def test_recovery_counts_what_close_will_write_for_any_key(path):
    keys = ["plain", "it's", 'say "hi"', "back\\slash", "new\nline", "é", "€uro", "😀" * 8]
    s = DataStore(path)
    for i, key in enumerate(keys):
        s.create(key, {"pad": "x" * (i * 700)}, ttl=3600 if i % 2 else None)
    counted = counted_size(s)
    abandon(s)
    with DataStore(path) as s:  # a scan, and .idx built from it
        assert counted_size(s) == counted
        assert_files_match_memory(s)
        assert sorted(s.keys()) == sorted(keys)


def one_by_one(data):
    """What recovery must index, by the rules for one record at a time: for
    each key, the block of its valid record with the highest sequence number."""
    newest = {}
    for block in range(1, fmt._blocks(len(data))):
        item = fmt._parse_item(data, block * fmt._BLOCK)
        if item and item[0] == fmt._VALUE and fmt._valid_key(item[2]):
            if item[2] not in newest or item[1] > newest[item[2]][0]:
                newest[item[2]] = (item[1], block)
    return {key: block for key, (_, block) in newest.items()}


def test_recovery_in_bulk_indexes_what_the_rules_for_one_record_accept(path):
    """The scan checks a chunk's value records all at once, and one by one
    only when one of them fails. Whatever bits are damaged, it must index
    exactly what _parse_item and _valid_key accept, record by record."""
    rng = random.Random(11)
    s = DataStore(path)
    for i in range(400):
        s.create(f"k{i}", {"pad": "x" * rng.randrange(0, 1500)}, ttl=3600 if i % 3 else None)
    for i in range(0, 400, 9):
        s.delete(f"k{i}")  # free markers among the records
    engine = s._engine
    bad_key = fmt._pack_value(engine.seq + 1, b"\xff", 0, b"{}")  # a valid CRC
    fmt._write_at(engine.dat, bad_key, fmt._blocks(engine.dat_size) * fmt._BLOCK)
    abandon(s)
    pristine = Path(f"{path}.dat").read_bytes()
    heads = [block * fmt._BLOCK for block in range(1, fmt._blocks(len(pristine)))
             if pristine.startswith(fmt._MAGIC, block * fmt._BLOCK)]
    live, damaged = 400 - len(range(0, 400, 9)), 0
    for _ in range(25):
        data = bytearray(pristine)
        for _ in range(rng.randrange(1, 8)):  # bits of heads, and anywhere
            at = rng.choice(heads) + rng.randrange(32) if rng.random() < 0.6 else rng.randrange(
                fmt._BLOCK, len(data))
            data[at] ^= 1 << rng.randrange(8)
        Path(f"{path}.dat").write_bytes(bytes(data))
        expected = one_by_one(bytes(data))
        with DataStore(path) as s:
            found = {key: fmt._slot_block(slot) for key, slot in indexed(s._engine)}
            assert_files_match_memory(s)
        assert found == expected
        damaged += len(expected) < live
    assert damaged > 10  # most rounds damaged a record that was live


def test_recovery_reads_records_across_chunk_boundaries(path, monkeypatch, caplog):
    monkeypatch.setattr(recovery, "_SCAN_CHUNK", 4096)  # records span chunks
    caplog.set_level(logging.INFO, logger="datastore")
    s = DataStore(path)
    for i in range(3000):
        s.create(f"k{i}", {"pad": "x" * (i % 1300)}, ttl=3600 if i % 2 else None)
    abandon(s)
    data = Path(f"{path}.dat").read_bytes()
    expected = one_by_one(data)
    caplog.clear()
    with DataStore(path) as s:
        assert {key: fmt._slot_block(slot) for key, slot in indexed(s._engine)} == expected
        assert len(s) == 3000 and s.read("k2999") == {"pad": "x" * (2999 % 1300)}
        assert_files_match_memory(s)
    assert "recovered 3000 keys after a crash" in caplog.text
    assert "skipped" not in caplog.text and "damaged" not in caplog.text


def float_bits(value):
    return struct.unpack("<Q", struct.pack("<d", value))[0]


@pytest.mark.parametrize("field, bad", [
    ("seq", fmt._MAX_SEQ), ("exp", fmt._LATEST_EXPIRY_BITS + 1),
    ("exp", float_bits(-1.0)), ("exp", float_bits(float("nan"))),
    ("length", MAX_VALUE_BYTES + 1)])
def test_recovery_skips_a_record_with_a_good_crc_and_a_field_out_of_range(path, field, bad):
    s = DataStore(path)
    for i in range(20):
        s.create(f"k{i}", {"i": i})
    engine = s._engine
    fields = {"seq": engine.seq + 1, "exp": 0, "length": 11}
    fields[field] = bad
    body = b'{"p":"' + b"x" * (fields["length"] - 8) + b'"}'
    head = fmt._FIELDS.pack(fmt._MAGIC, fmt._VALUE, 2, 0, fields["seq"], fields["exp"], len(body))
    crc = zlib.crc32(body, zlib.crc32(b"k5", zlib.crc32(head)))
    record = head + crc.to_bytes(4, "little") + b"k5" + body
    fmt._write_at(engine.dat, record, fmt._blocks(engine.dat_size) * fmt._BLOCK)
    abandon(s)  # valid but for that field, and newer than k5's own record
    with DataStore(path) as s:
        assert live_content(s) == {f"k{i}": {"i": i} for i in range(20)}


def test_head_columns_are_little_endian_numbers_on_any_machine(monkeypatch):
    buf = bytes(range(256)) * 4 + fmt._MAGIC  # whole blocks, and a short one
    starts = range(0, 1024, fmt._BLOCK)
    columns = recovery._head_columns(buf, starts)
    assert [list(column) for column in columns] == [
        [struct.unpack_from("<Q", buf, off + 8 * i)[0] for off in starts] for i in range(4)]
    # A big-endian machine copies the bytes and swaps each number; pretend to
    # be one here, where the machine is little-endian: the numbers come out
    # swapped, which is what makes them right there.
    monkeypatch.setattr(recovery.sys, "byteorder", "big")
    swapped = recovery._head_columns(buf, starts)
    assert [list(column) for column in swapped] == [
        [struct.unpack_from(">Q", buf, off + 8 * i)[0] for off in starts] for i in range(4)]


def test_recovery_keeps_the_newest_copy_and_invalidates_the_others(path):
    s = DataStore(path)
    for key in ("a", "x", "k", "b"):
        s.create(key, {"v": key})
    s._engine._move = lambda limit: 0  # no move may overwrite the older copy
    s.delete("x")  # a free block before "k", so "k" is not at the start of a gap
    engine = s._engine
    newer = fmt._pack_value(engine.seq + 5, b"k", 0, b'{"v":"newer"}')
    fmt._write_at(engine.dat, newer, fmt._blocks(engine.dat_size) * fmt._BLOCK)
    abandon(s)  # two valid copies of "k", the newer one after the older
    with DataStore(path) as s:
        assert live_content(s) == {"a": {"v": "a"}, "k": {"v": "newer"}, "b": {"v": "b"}}
        s._engine._move = lambda limit: 0
        s.delete("k")
        abandon(s)  # had recovery left the older copy valid, it would be back
    with DataStore(path) as s:
        assert live_content(s) == {"a": {"v": "a"}, "b": {"v": "b"}}


@pytest.mark.parametrize("seqs", [(1, 9, 5), (1, 5, 9), (9, 5, 1), (5, 9, 1)])
@pytest.mark.parametrize("chunk", [recovery._SCAN_CHUNK, fmt._BLOCK], ids=["one-chunk", "a-chunk-each"])
def test_recovery_keeps_the_newest_of_three_copies_and_invalidates_both_others(
        path, monkeypatch, seqs, chunk):
    monkeypatch.setattr(recovery, "_SCAN_CHUNK", chunk)
    s = DataStore(path)
    s.create("a", {"v": "a"})
    engine = s._engine
    at = fmt._blocks(engine.dat_size)
    for i, seq in enumerate(seqs):
        copy = fmt._pack_value(engine.seq + seq, b"k", 0, b'{"v":%d}' % seq)
        fmt._write_at(engine.dat, copy, (at + i) * fmt._BLOCK)
    fmt._write_at(engine.dat, fmt._pack_value(engine.seq + 20, b"z", 0, b"{}"),
                  (at + 3) * fmt._BLOCK)  # after them, so no truncation takes them away
    abandon(s)
    with DataStore(path) as s:
        assert live_content(s) == {"a": {"v": "a"}, "k": {"v": 9}, "z": {}}
        s._engine._move = lambda limit: 0
        s.delete("k")
        abandon(s)  # had recovery left an older copy valid, it would be back
    with DataStore(path) as s:
        assert live_content(s) == {"a": {"v": "a"}, "z": {}}


def test_sequence_numbers_keep_rising_across_reopen_and_recovery(path):
    def highest_on_disk(engine):
        return max(fmt._HEAD.unpack(fmt._read_at(
            engine.dat, fmt._HEAD.size, fmt._slot_block(slot) * fmt._BLOCK))[4]
            for _, slot in indexed(engine))

    now = time.time()
    engine = _Engine(str(path), MAX_STORE_BYTES).open()
    for i in range(10):
        engine.put(b"k%d" % i, b'{"i":%d}' % i, 0.0, now)
    engine.close(now)
    engine = _Engine(str(path), MAX_STORE_BYTES).open()  # from the header written at close
    assert engine.seq > highest_on_disk(engine)
    engine.put(b"k10", b"{}", 0.0, now)
    bound = engine.lease  # what the header says no number issued reaches
    engine.close_files()  # as a killed process leaves it: nothing written at close
    engine = _Engine(str(path), MAX_STORE_BYTES).open()  # from the scan, and not below the header's bound
    assert engine.seq > highest_on_disk(engine) and engine.seq >= bound
    engine.close(now)


# --- The newer copy is durable before the older goes ----------------------

def test_recovery_fsyncs_the_newer_copy_before_it_invalidates_the_older(tmp_path, monkeypatch):
    path = tmp_path / "store"
    s = DataStore(path)
    s.set("k", {"v": "old"})
    s.sync()  # the old copy is durable
    engine = s._engine
    old_block = fmt._slot_block(engine.lookup(b"k"))
    new_block = fmt._blocks(engine.dat_size)
    newer = fmt._pack_value(engine.seq + 5, b"k", 0, b'{"v":"new"}')
    fmt._write_at(engine.dat, newer, new_block * fmt._BLOCK)  # as a set() killed after its write
    abandon(s)
    log = []
    real_fsync, real_pwrite = os.fsync, os.pwrite
    monkeypatch.setattr(os, "fsync", lambda fd: log.append(("fsync",)) or real_fsync(fd))
    monkeypatch.setattr(os, "pwrite", lambda fd, data, pos: log.append(("pwrite", pos))
                        or real_pwrite(fd, data, pos))
    with DataStore(path) as s:
        monkeypatch.undo()
        assert s.read("k") == {"v": "new"}
    invalidation = log.index(("pwrite", old_block * fmt._BLOCK))
    assert ("fsync",) in log[:invalidation]
