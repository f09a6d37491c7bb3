#!/usr/bin/env python3
"""Write the committed seed corpus (fuzz/corpus/<target>/seed-*): a few valid
and edge-case inputs per target, in each harness's input format (see
fuzz/src/harness/*.rs). Re-run after changing an input format."""
import os, struct

HERE = os.path.dirname(os.path.abspath(__file__))

def out(target, name, data):
    d = os.path.join(HERE, "corpus", target)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, "seed-" + name), "wb") as f:
        f.write(data)

# ---------------------------------------------------------------- blkif_request
OFF = {64: dict(slot=112, id=8, sector=16, seg=24, dnr=24, inr=2, igrefs=28),
       32: dict(slot=108, id=4, sector=12, seg=20, dnr=20, inr=2, igrefs=24)}

def disk(flags=30, sectors=2048, lss_idx=0, maxind_sel=3):
    return bytes([flags, 3]) + struct.pack("<H", sectors) + bytes([lss_idx, maxind_sel])

def slot(abi, op, b1=0, rid=0x1234, sector=0, segs=(), dnr=None, inr=None, igrefs=()):
    o = OFF[abi]
    s = bytearray(o["slot"])
    s[0] = op; s[1] = b1
    struct.pack_into("<Q", s, o["id"], rid)
    struct.pack_into("<Q", s, o["sector"], sector)
    for i, (g, f, l) in enumerate(segs):
        struct.pack_into("<IBB", s, o["seg"] + 8 * i, g, f, l)
    if dnr is not None:
        struct.pack_into("<Q", s, o["dnr"], dnr)
    if inr is not None:
        struct.pack_into("<H", s, o["inr"], inr)
    for i, g in enumerate(igrefs):
        struct.pack_into("<I", s, o["igrefs"] + 4 * i, g)
    return bytes(s)

def segpages(segs):
    b = bytearray()
    for g, f, l in segs:
        b += struct.pack("<IBBH", g, f, l, 0)
    return bytes(b)

for abi in (64, 32):
    a = bytes([1 if abi == 64 else 0])
    out("blkif_request", f"read-{abi}", a + disk() + slot(abi, 0, 1, sector=8, segs=[(5, 0, 7)]))
    out("blkif_request", f"write11-{abi}", a + disk() + slot(abi, 1, 11, sector=16, segs=[(i, 0, 7) for i in range(11)]))
    out("blkif_request", f"write-partial-{abi}", a + disk() + slot(abi, 1, 2, sector=2040, segs=[(3, 2, 5), (4, 0, 3)]))
    out("blkif_request", f"barrier0-{abi}", a + disk() + slot(abi, 2, 0))
    out("blkif_request", f"barrier-{abi}", a + disk() + slot(abi, 2, 1, sector=1, segs=[(3, 0, 0)]))
    out("blkif_request", f"flush-{abi}", a + disk() + slot(abi, 3))
    out("blkif_request", f"discard-{abi}", a + disk() + slot(abi, 5, 1, sector=8, dnr=16))
    out("blkif_request", f"discard4k-{abi}", a + disk(lss_idx=1) + slot(abi, 5, 0, sector=8, dnr=8))
    out("blkif_request", f"read4k-{abi}", a + disk(lss_idx=1) + slot(abi, 0, 1, sector=8, segs=[(5, 0, 7)]))
    segs = [(100 + i, 0, 7) for i in range(3)]
    out("blkif_request", f"indirect-read-{abi}", a + disk() + slot(abi, 6, 0, sector=64, inr=3, igrefs=[9]) + segpages(segs) + bytes(4096 - 24))
    segs = [(200 + i, i % 8, 7) for i in range(256)]
    out("blkif_request", f"indirect-write-{abi}", a + disk(maxind_sel=3) + slot(abi, 6, 1, sector=0, inr=256, igrefs=[9]) + segpages(segs))
    segs = [(300 + i, 0, 7) for i in range(600)]
    out("blkif_request", f"indirect-2pages-{abi}", a + disk(maxind_sel=4, sectors=65535) + slot(abi, 6, 0, sector=8, inr=600, igrefs=[9, 10]) + segpages(segs))
    out("blkif_request", f"ro-write-{abi}", a + disk(flags=31) + slot(abi, 1, 1, segs=[(5, 0, 7)]))
    out("blkif_request", f"unknown-op-{abi}", a + disk() + slot(abi, 4, 1))
    out("blkif_request", f"end-of-disk-{abi}", a + disk() + slot(abi, 0, 1, sector=2047, segs=[(5, 0, 1)]))

# ---------------------------------------------------------------- fekeys
KEYS = ["protocol", "multi-queue-num-queues", "ring-page-order", "ring-ref", "ring-ref0",
        "ring-ref1", "ring-ref2", "ring-ref3", "ring-ref7", "ring-ref15", "event-channel",
        "feature-persistent"]
VALUES = ["0", "1", "2", "3", "4", "5", "16", "-1", "+1", " 1", "1 ", "0x10", "1e3",
          "4294967295", "4294967296", "18446744073709551615", "18446744073709551616",
          "99999999999999999999999", "", "\0", "1\0", "x86_64-abi", "x86_32-abi",
          "x86_64-abi\0", "arm-abi", "X86_64-ABI", "00000000000000000001", "000000000000000000001"]
DIRS = ["", "queue-0/", "queue-1/", "queue-2/", "queue-3/", "queue-17/"]

def fe_limits(order_idx=3, q_idx=3):
    return bytes([order_idx, q_idx])

def fe_entry(d, k, v):
    if isinstance(v, int):
        return bytes([DIRS.index(d), KEYS.index(k), 5]) + struct.pack("<I", v)
    return bytes([DIRS.index(d), KEYS.index(k), 0, VALUES.index(v)])

out("fekeys", "single", fe_limits() + fe_entry("", "ring-ref", 8) + fe_entry("", "event-channel", 17))
out("fekeys", "single64", fe_limits() + fe_entry("", "protocol", "x86_64-abi") + fe_entry("", "ring-ref", 8) + fe_entry("", "event-channel", 17) + fe_entry("", "feature-persistent", "1"))
out("fekeys", "order2", fe_limits() + fe_entry("", "ring-page-order", "2") + b"".join(fe_entry("", f"ring-ref{i}", 10 + i) for i in range(4)) + fe_entry("", "event-channel", 3))
out("fekeys", "twoqueues", fe_limits() + fe_entry("", "multi-queue-num-queues", "2") + fe_entry("queue-0/", "ring-ref", 8) + fe_entry("queue-0/", "event-channel", 1) + fe_entry("queue-1/", "ring-page-order", "1") + fe_entry("queue-1/", "ring-ref0", 9) + fe_entry("queue-1/", "ring-ref1", 10) + fe_entry("queue-1/", "event-channel", 2))
out("fekeys", "bad-order", fe_limits() + fe_entry("", "ring-page-order", "5") + fe_entry("", "ring-ref", 8) + fe_entry("", "event-channel", 17))
out("fekeys", "huge", fe_limits() + bytes([0, KEYS.index("ring-ref"), 6]) + struct.pack("<H", 4096) + bytes([0]) + fe_entry("", "event-channel", 17))
out("fekeys", "notutf8", fe_limits() + bytes([0, KEYS.index("protocol"), 7, 3, 0xff, 0xfe, 0x80]) + fe_entry("", "ring-ref", 8) + fe_entry("", "event-channel", 17))

# ---------------------------------------------------------------- xs_wire
def msg(ty, req, tx, payload):
    return struct.pack("<IIII", ty, req, tx, len(payload)) + payload

out("xs_wire", "reply", bytes([0]) + msg(2, 1, 0, b"value"))
out("xs_wire", "chunked", bytes([3, 1, 5, 0]) + msg(15, 0, 0, b"/local/domain/7\0tok\0") + msg(16, 4, 0, b"ENOENT\0") + msg(3, 2, 0, b"n0\0r7\0b5\0"))
out("xs_wire", "toobig", bytes([0]) + struct.pack("<IIII", 2, 1, 0, 4097) + b"x" * 20)
out("xs_wire", "truncated", bytes([1, 2]) + msg(1, 3, 0, b"a\0b\0c\0")[:-3])
out("xs_wire", "max", bytes([0]) + msg(11, 9, 1, b"p\0" + b"v" * 4094))

# ---------------------------------------------------------------- xenstored
WORDS = [b"/", b"/secret", b"/local", b"/local/domain", b"/local/domain/7", b"/local/domain/7/data",
         b"/local/domain/7/data/x", b"/local/domain/0", b"/local/domain/0/backend", b"data", b"data/x",
         b"../secret", b"a//b", b"/local/domain/7/", b"@releaseDomain", b"@introduceDomain", b"@other",
         b"/tool/xenstored", b"", b"n0", b"b7", b"r0", b"w7", b"n7", b"b0", b"r7", b"x7", b"0", b"1",
         b"7", b"8", b"65535", b"32752", b"4294967296", b"-1", b"T", b"F", b"sim-as-domain", b"help",
         b"print", b"check", b"tok", b"SECRET"]

def op(domu, ty, words, tx_sel=0, last_nul=True):
    b = bytes([1 if domu else 0, ty % 16 if ty < 14 else ty, 1, tx_sel, len(words)])
    b = bytes([1 if domu else 0, 0, 1, tx_sel, len(words)])
    # ty byte: (sel % 16 < 14) -> u8 % 24 follows
    b = bytes([1 if domu else 0, 0, ty, 1, tx_sel, len(words)])
    for i, w in enumerate(words):
        b += bytes([0, WORDS.index(w)])
        if i + 1 == len(words):
            b += bytes([1 if last_nul else 0])
    return b + bytes([0])

XS = dict(CONTROL=0, DIRECTORY=1, READ=2, GET_PERMS=3, WATCH=4, UNWATCH=5, TSTART=6, TEND=7,
          INTRODUCE=8, RELEASE=9, GDP=10, WRITE=11, MKDIR=12, RM=13, SET_PERMS=14, IDI=17,
          RESUME=18, SET_TARGET=19, RESET=21, DPART=22)
out("xenstored", "domu-basics", op(1, XS["WRITE"], [b"data", b"7"], last_nul=False) + op(1, XS["READ"], [b"data"]) + op(1, XS["DIRECTORY"], [b"/local/domain/7"]) + op(1, XS["READ"], [b"/secret"]))
out("xenstored", "domu-tx", op(1, XS["TSTART"], [b""]) + op(1, XS["WRITE"], [b"data/x", b"1"], tx_sel=5, last_nul=False) + op(1, XS["TEND"], [b"T"], tx_sel=5))
out("xenstored", "domu-perms", op(1, XS["SET_PERMS"], [b"/local/domain/7", b"n0"]) + op(1, XS["SET_PERMS"], [b"data", b"n7", b"r0"]) + op(1, XS["GET_PERMS"], [b"/secret"]) + op(1, XS["WATCH"], [b"/secret", b"tok"]))
out("xenstored", "domu-priv", op(1, XS["INTRODUCE"], [b"8", b"1", b"1"]) + op(1, XS["CONTROL"], [b"sim-as-domain", b"0"]) + op(1, XS["SET_TARGET"], [b"7", b"0"]) + op(1, XS["RM"], [b"/"]))
out("xenstored", "dom0-mix", op(0, XS["INTRODUCE"], [b"8", b"1", b"1"]) + op(0, XS["SET_TARGET"], [b"7", b"0"]) + op(1, XS["READ"], [b"/local/domain/0"]) + op(0, XS["RELEASE"], [b"8"]) + op(0, XS["DPART"], [b"/local", b"0"]))

# ---------------------------------------------------------------- ring
def r_sector(sec):
    return bytes([4]) + struct.pack("<H", sec)

def r_rw(op, sec, segs):  # op class: 0 read, 8 write, 16 barrier
    b = bytes([(op << 3) | 1]) + r_sector(sec) + bytes([1, len(segs) - 1 if segs else 255])
    for sel in segs:
        b += bytes([sel, 2])
    return b

def r_flush():
    return bytes([(18 << 3) | 1]) + r_sector(0) + bytes([1])

def r_discard(sec, n):
    return bytes([(20 << 3) | 1]) + r_sector(sec) + bytes([0, 2, n - 1])

def r_indirect(write, sec, nr):
    return bytes([(22 << 3) | 1]) + r_sector(sec) + bytes([1 if write else 4, 3, nr - 1]) + bytes([1] * 8)

def r_batch(slots, runs=((64, 0),), mode=0):
    b = bytes([mode]) + (bytes([0]) if 251 <= mode <= 253 else b"") + bytes([len(slots), len(runs)])
    for count, sel in runs:
        b += bytes([count - 1, sel, 1])
    return b + b"".join(slots)

for dev in range(3):
    d = bytes([dev])
    out("ring", f"rw-{dev}", d + r_batch([r_rw(8, 0, [0, 1]), r_rw(0, 64, [0, 1, 2]), r_flush()]) + r_batch([r_rw(0, 0, [3, 4])]))
    out("ring", f"indirect-{dev}", d + r_batch([r_indirect(True, 128, 40), r_indirect(False, 128, 40)], runs=((40, 3),)))
    out("ring", f"discard-barrier-{dev}", d + r_batch([r_discard(16, 8), r_rw(16, 16, [1]), r_rw(16, 0, [])]))
    out("ring", f"full-{dev}", d + r_batch([r_rw(0, 8 * i, [i % 8]) for i in range(32)]))
    out("ring", f"overflow-{dev}", d + r_batch([r_rw(0, 0, [0])], mode=251) + r_batch([r_rw(0, 0, [0])]))
    out("ring", f"behind-{dev}", d + r_batch([], mode=252) + r_batch([r_flush()]))

# ---------------------------------------------------------------- xs_client
def xc_act(sel, body=b""):
    assert len(body) % 4 == 0 and len(body) <= 64
    return bytes([sel, len(body) // 4]) + body

out("xs_client", "read-ok", bytes([0, 1, 2, 3]) + xc_act(0, b"valu") + xc_act(0, b"a\0b\0") + xc_act(0, b"n0\0\0") + xc_act(0, b"12\0\0"))
out("xs_client", "errors", bytes([0, 6, 4, 5]) + xc_act(6, b"ENOENT\0\0") + xc_act(6, b"EACC") + xc_act(9, b"/d\0tok\0\0") + xc_act(0) + xc_act(6, b"EAGAIN\0\0"))
out("xs_client", "wrong-id", bytes([0, 0, 0, 0]) + xc_act(7, b"xxxx") + b"\x07\x00\x00\x00" + xc_act(0))
out("xs_client", "toobig", bytes([1, 0, 0, 0]) + xc_act(11))
out("xs_client", "truncated", bytes([2, 0, 0, 0]) + xc_act(12))
out("xs_client", "close", bytes([3, 0, 0, 0]) + xc_act(14))
