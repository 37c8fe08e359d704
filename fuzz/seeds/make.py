#!/usr/bin/env python3
"""Writes the seed corpora in fuzz/corpus/: valid inputs for each target, so short
fuzzing runs start from meaningful inputs. Run it after changing the cli syntax, the
control commands, ipc::Message or the table layout, and check the seeds in."""
import os
import struct

HERE = os.path.dirname(os.path.abspath(__file__))
CORPUS = os.path.join(HERE, "..", "corpus")


def write(target, name, data):
    d = os.path.join(CORPUS, target)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, name), "wb") as f:
        f.write(data)


ARGV = {
    "proxy-groups": ["8000", "127.0.0.1:8001", "127.0.0.2::5", "!", "[::1]:8003", "%"],
    "proxy-options": ["-fdaH", "-t", "5", "-T30", "-B", "10.0.0.1", "-b", "127.0.0.1",
                      "--workers=4", "--user", "nobody", "smtp", "mail1:smtp", "h:www:3"],
    "proxy-long": ["--run-dir=/tmp/b", "--pidfile", "/run/b.pid", "--syslog-socket=/dev/log",
                   "--log-connections", "--control-group", "ops", "-6", "80", "2001:db8::5",
                   "--", "-x"],
    "shell-command": ["-b", "::1", "--json", "-c", "mrtg-bytes 0 1", "8000"],
    "shell-interactive": ["-d", "-i", "http"],
    "help": ["--help"],
    "version": ["-V"],
}
for name, argv in ARGV.items():
    write("cli_args", name, b"\0".join(a.encode() for a in argv))

COMMANDS = ["show", "show json", "disable 1", "e 2", "group 31", "reset -1", "create h:80",
            "create ::1 8000", "assign 0 [::1]:81", "assign 1 h smtp", "maxc 3 2147483647",
            "mrtg-bytes 0 0", "mrtg-conns 1 63", "hash", "rr", "kill", "quit", "?", "version",
            "  \t ", "h"]
for i, line in enumerate(COMMANDS):
    write("control_command", f"line-{i:02}", line.encode())


def varint(n):
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def text(s):
    b = s.encode()
    return varint(len(b)) + b


# Postcard encodings of ipc::Message: the variant index, then the fields in order.
START_V4 = (varint(0) + varint(3) + varint(2) + varint(5) + b"\x01" + varint(300)
            + b"\x01" + varint(60) + b"\x00" + b"\x01" + b"\x01" + varint(0) + bytes([127, 0, 0, 1]) + b"\x01"
            + b"\x00" + b"\x01" + varint(3) + varint(8001) + varint(25) + varint(65535))
START_V6 = (varint(0) + varint(0) + varint(1) + varint(1) + b"\x00" + b"\x00" + b"\x01" + b"\x00"
            + b"\x01" + varint(1) + bytes(15) + b"\x01" + b"\x00" + b"\x01" + b"\x00" + varint(0))
MESSAGES = {
    "start-v4": START_V4,
    "start-v6": START_V6,
    "drain": varint(1),
    "ready": varint(2) + b"\x00",
    "ready-landlock": varint(2) + b"\x01" + text("landlock ABI 1 only"),
    "disable": varint(3) + varint(3) + varint(63) + varint(0) + bytes([127, 0, 0, 1])
               + varint(8001),
    "log": varint(4) + varint(1) + text("connection failed group 0 channel 1"),
    "stopped-accepting": varint(5),
    "accept": varint(6),
    "notice": varint(7) + text("connection failed group 0 channel 1")
              + varint(1) + b"\x01" + varint(0) + varint(1) + varint(7),
}
for name, data in MESSAGES.items():
    write("ipc_message", name, data)

# table_reader input: hash, cursor seed, flags, header word index, header word value, then
# the bytes from the first group on (Group: nchannels, kind, cursor, reserved; Channel:
# status, port, family, maxc, addr[4], scope_id, then 28 reserved bytes). In the table the
# cursor word is reserved: the harness copies it to the group's cursor in the counters.
GROUPS, CHANNELS = 32, 64


def group(n, kind, cursor=0):
    return struct.pack("<4I", n, kind, cursor, 0)


def channel(status, port, family, maxc, addr, scope=0):
    return struct.pack("<3Ii4I2I3Q", status, port, family, maxc, *addr, scope, 0, 0, 0, 0)


def prefix(hash_, seed, flags, word=0, value=0):
    return struct.pack("<IIBBI", hash_, seed, flags, word, value)


V4 = lambda a, b, c, d: ((a << 24) | (b << 16) | (c << 8) | d, 0, 0, 0)
groups = (group(3, 0, 1) + group(2, 1) + group(1, 0)
          + group(0, 0) * (GROUPS - 3))
group0 = (channel(1, 8001, 4, 0, V4(127, 0, 0, 1)) + channel(0, 8002, 4, 5, V4(127, 0, 0, 2))
          + channel(1, 8003, 6, 0, (0, 0, 0, 1)))
group0 += bytes(64 * CHANNELS - len(group0))
group1 = channel(1, 25, 4, 1, V4(10, 0, 0, 1)) + channel(1, 25, 6, 0, (0xFE800000, 0, 0, 1), 2)
group1 += bytes(64 * CHANNELS - len(group1))
group2 = channel(1, 65535, 4, -1, V4(192, 0, 2, 9))
write("table_reader", "header-only", prefix(0, 0, 0))
write("table_reader", "bad-version", prefix(7, 0, 2, 2, 2))
write("table_reader", "odd-seq", prefix(7, 0, 2, 11, 3))
write("table_reader", "groups", prefix(1, 0, 1) + groups)
write("table_reader", "three-groups", prefix(4, 9, 4) + groups + group0 + group1 + group2)
write("table_reader", "hostile-counts",
      prefix(5, 0, 1) + group(0xFFFFFFFF, 77, 0xFFFFFFFF) + group(64, 1, 63))
