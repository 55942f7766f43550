"""Reading tar shards with bounded memory, whatever their headers or compression declare.

webdataset's reader (`tarfile` in stream mode) reads every selected member whole, of whatever
size its header declares: a 140 KB tar holding a sparse 1 GB member, or a few MB of gzip that
inflate to a huge member, take gigabytes per worker. Python's `tarfile` also reads GNU long-name
and pax headers whole. This reader parses the tar headers itself (ustar, GNU and pax, the formats
tar, webdataset and img2dataset write) so that nothing is ever held beyond a bound:

- a member larger than `max_member` bytes (its real size: after decompression, sparse holes
  included) is never read: it is skipped on the stream and handed on as a `Refused` marker, so
  that the decoder can skip and count the sample, or name it in one line (`data.on_error`);
- extended headers (pax records, GNU long names) are read up to `MAX_HEADER` bytes; beyond that
  the shard is unreadable;
- gzip, bzip2 and xz shards are inflated as a stream, a chunk at a time.

The samples come out as webdataset's `group_by_keys` makes them: {"__key__", "__url__", SUFFIX: bytes}.
"""

from __future__ import annotations

import bz2
import gzip
import lzma
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

BLOCK = 512
MAX_HEADER = 1 << 20  # pax records or a GNU long name: longer is not a real path
_CHUNK = 1 << 20


class TarFormatError(Exception):
    """Shard data that is not a tar this reader can follow; args: (message, url)."""


@dataclass(frozen=True)
class Refused:
    """Stands in for a member's bytes when they were not read: `why` says why, in a few words."""

    why: str

    def __len__(self) -> int:  # so that code that sizes members counts it as nothing
        return 0


class _Prefixed:
    """A stream with its first bytes read already (to sniff the compression) put back in front."""

    def __init__(self, head: bytes, stream):
        self.head, self.stream = head, stream

    def read(self, n: int = -1) -> bytes:
        if self.head:
            if n is None or n < 0:
                out, self.head = self.head + self.stream.read(), b""
                return out
            out, self.head = self.head[:n], self.head[n:]
            if len(out) < n:
                out += self.stream.read(n - len(out))
            return out
        return self.stream.read(n)

    def readable(self) -> bool:
        return True


def _decompressed(raw, url: str):
    """The tar stream of `raw`: as it is, or inflated by gzip, bzip2 or xz (sniffed from its magic)."""
    head = raw.read(6)
    stream = _Prefixed(head, raw)
    if head[:2] == b"\x1f\x8b":
        return gzip.GzipFile(fileobj=stream, mode="rb")
    if head[:3] == b"BZh":
        return bz2.BZ2File(stream, "rb")
    if head[:6] == b"\xfd7zXZ\x00":
        return lzma.LZMAFile(stream, "rb")
    if head[:4] == b"\x28\xb5\x2f\xfd":
        raise TarFormatError("zstd-compressed shard: not supported (decompress it, or use gzip)", url)
    if getattr(raw, "seekable", lambda: False)():  # a local file: members not wanted are seeked over
        raw.seek(0)
        return raw
    return stream


def _read_upto(stream, n: int) -> bytes:
    """n bytes, fewer only at the end of the stream (pipes may return less per read)."""
    parts, left = [], n
    while left > 0:
        chunk = stream.read(min(left, _CHUNK))
        if not chunk:
            break
        parts.append(chunk)
        left -= len(chunk)
    return b"".join(parts)


def _read_exact(stream, n: int, url: str, what: str) -> bytes:
    data = _read_upto(stream, n)
    if len(data) < n:
        raise TarFormatError(f"truncated tar: {what} ends {n - len(data)} bytes early", url)
    return data


def _skip(stream, n: int, url: str, what: str) -> None:
    """Move past n bytes without holding them."""
    seek = getattr(stream, "seek", None)
    if seek is not None and getattr(stream, "seekable", lambda: False)():
        here = stream.tell()
        stream.seek(n, 1)
        if stream.tell() - here == n:
            return
        raise TarFormatError(f"truncated tar: {what} ends early", url)
    while n > 0:
        chunk = stream.read(min(n, _CHUNK))
        if not chunk:
            raise TarFormatError(f"truncated tar: {what} ends {n} bytes early", url)
        n -= len(chunk)


def _padded(size: int) -> int:
    return -(-size // BLOCK) * BLOCK


def _number(field: bytes, url: str) -> int:
    """A numeric header field: NUL/space-terminated octal, or GNU base-256 (first byte 0x80)."""
    if field and field[0] & 0x80:
        value = int.from_bytes(field[1:], "big")
        return -value if field[0] == 0xFF else value  # 0xff: negative (never valid for a size)
    text = field.split(b"\0", 1)[0].strip(b" \0")
    try:
        return int(text, 8) if text else 0
    except ValueError:
        raise TarFormatError(f"bad number {field[:12]!r} in a tar header", url) from None


def _text(field: bytes) -> str:
    return field.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")


def _pax(data: bytes, url: str) -> dict[str, str]:
    """pax extended header records: "LEN KEY=VALUE\\n" ..."""
    out, i = {}, 0
    while i < len(data):
        space = data.find(b" ", i)
        if space < 0 or not data[i:space].isdigit():
            if not data[i:].strip(b"\0"):
                break
            raise TarFormatError("malformed pax header", url)
        length = int(data[i:space])
        record = data[space + 1 : i + length]
        if length <= 0 or not record.endswith(b"\n") or b"=" not in record:
            raise TarFormatError("malformed pax header record", url)
        key, value = record[:-1].split(b"=", 1)
        out[key.decode("utf-8", "replace")] = value.decode("utf-8", "surrogateescape")
        i += length
    return out


def members(raw, url: str, select: Callable[[str], bool], max_member: int) -> Iterator[dict]:
    """{"fname", "data"} of the regular members of the tar stream `raw` that `select` takes, in order;
    "data" is their bytes, or `Refused` when larger than `max_member` (or stored sparse)."""
    stream = _decompressed(raw, url)
    pax: dict[str, str] = {}
    long_name: str | None = None
    zero_blocks = 0
    while True:
        header = _read_upto(stream, BLOCK)
        if len(header) < BLOCK:
            if not header:
                return  # ended without the two zero blocks (many writers omit them): fine
            raise TarFormatError("truncated tar header", url)
        if header == bytes(BLOCK):
            zero_blocks += 1
            if zero_blocks == 2:
                return
            continue
        zero_blocks = 0
        try:
            checksum = _number(header[148:156], url)
        except TarFormatError:
            checksum = -1
        if checksum not in (sum(header[:148]) + 256 + sum(header[156:]), _signed_sum(header)):
            raise TarFormatError("bad tar header checksum (not a tar, or damaged)", url)
        kind = header[156:157]
        size = _number(header[124:136], url)
        if size < 0:
            raise TarFormatError("negative member size in a tar header", url)
        if kind in (b"x", b"g", b"X", b"L", b"K"):  # pax (local, global, Solaris) or GNU long name/link
            if size > MAX_HEADER:
                raise TarFormatError(f"extended tar header of {size} bytes (at most {MAX_HEADER} are read)", url)
            data = _read_exact(stream, size, url, "an extended header")
            _skip(stream, _padded(size) - size, url, "an extended header")
            if kind in (b"x", b"X"):
                pax = _pax(data, url)
            elif kind == b"L":
                long_name = data.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
            continue
        name = pax.get("GNU.sparse.name") or pax.get("path") or long_name
        if name is None:
            prefix = _text(header[345:500]) if header[257:262] == b"ustar" else ""
            name = f"{prefix}/{_text(header[:100])}" if prefix else _text(header[:100])
        if "size" in pax:
            try:
                size = int(pax["size"])
            except ValueError:
                raise TarFormatError(f"bad pax size {pax['size'][:40]!r}", url) from None
        sparse = kind == b"S" or any(k.startswith("GNU.sparse.") for k in pax)
        real = size
        if kind == b"S":
            real = _number(header[483:495], url)  # the GNU sparse member's real size
            extended = header[482]
            while extended:  # sparse map continuation blocks: one at a time
                block = _read_exact(stream, BLOCK, url, "a sparse map")
                extended = block[504]
        elif "GNU.sparse.realsize" in pax or "GNU.sparse.size" in pax:
            real = int(pax.get("GNU.sparse.realsize") or pax.get("GNU.sparse.size") or 0)
        pax, long_name = {}, None
        stored = _padded(size)
        regular = kind in (b"0", b"\0", b"7", b"S")
        if not regular or not select(name):
            _skip(stream, stored, url, f"member '{name[:200]}'")
            continue
        if real > max_member:
            _skip(stream, stored, url, f"member '{name[:200]}'")
            yield {"fname": name, "data": Refused(f"{real} bytes, over data.max_member_bytes={max_member}")}
            continue
        if sparse:
            _skip(stream, stored, url, f"member '{name[:200]}'")
            yield {"fname": name, "data": Refused("stored sparse (holes), which shards never need")}
            continue
        data = _read_exact(stream, size, url, f"member '{name[:200]}'")
        _skip(stream, stored - size, url, f"member '{name[:200]}'")
        yield {"fname": name, "data": data}


def _signed_sum(header: bytes) -> int:
    """The header checksum as some old tars computed it, with signed bytes."""

    def signed(b: int) -> int:
        return b - 256 if b > 127 else b

    return sum(signed(b) for b in header[:148]) + 256 + sum(signed(b) for b in header[156:])


def samples(
    urls: Iterable[str],
    *,
    select: Callable[[str], bool],
    max_member: int,
    handler: Callable[[Exception], bool] | None = None,
) -> Iterator[dict]:
    """The samples of the shards `urls`, in order, grouped by key as webdataset does. An unreadable
    shard calls `handler(exception)` (True: go on with the next shard); without one it raises."""
    from webdataset.gopen import gopen
    from webdataset.tariterators import group_by_keys

    def files():
        for url in urls:
            try:
                raw = gopen(url, "rb")
            except Exception as exn:  # noqa: BLE001 - a missing file, a failed command
                exn.args = (*exn.args, url)
                if handler is None or not handler(exn):
                    raise
                continue
            try:
                for member in members(raw, url, select, max_member):
                    member["__url__"] = url
                    yield member
            except Exception as exn:  # noqa: BLE001 - damaged data, a pipe that failed
                if not isinstance(exn, TarFormatError):
                    exn.args = (*exn.args, url)
                if handler is None or not handler(exn):
                    raise
            finally:
                try:
                    raw.close()
                except Exception:  # noqa: BLE001 - a pipe's exit status was reported above if it mattered
                    pass
            yield {}  # the end of a shard: samples never span two shards

    def reraise(exn: Exception) -> bool:
        if handler is None:
            raise exn
        return handler(exn)

    return group_by_keys(files(), handler=reraise)
