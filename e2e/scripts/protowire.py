"""Hand-encoded protobuf for the e2e scripts, so that nothing of Filterplane's code reads or
writes what they send: varints, length-delimited fields, and reading a message's fields."""


def varint(n):
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def field(num, payload):
    return varint(num << 3 | 2) + varint(len(payload)) + payload


def read_varint(buf, pos):
    n, shift = 0, 0
    while True:
        b = buf[pos]
        pos += 1
        n |= (b & 0x7F) << shift
        shift += 7
        if not b & 0x80:
            return n, pos


def fields(buf):
    """Every field of a message: (number, bytes or int)."""
    pos, out = 0, []
    while pos < len(buf):
        key, pos = read_varint(buf, pos)
        num, wire = key >> 3, key & 7
        if wire == 2:
            n, pos = read_varint(buf, pos)
            out.append((num, buf[pos:pos + n]))
            pos += n
        elif wire == 0:
            v, pos = read_varint(buf, pos)
            out.append((num, v))
        elif wire == 1:
            pos += 8
        elif wire == 5:
            pos += 4
        else:
            raise ValueError(f"wire type {wire}")
    return out


def text(num, s):
    return field(num, s.encode())
