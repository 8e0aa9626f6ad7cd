"""A DNS server on loopback UDP for the proxy tests: it answers A queries for the names it holds
with their addresses, which the test may change (as a StatefulSet pod's record changes when the
pod is replaced, or goes when it is not ready), NXDOMAIN for other names, and an empty answer
for other record types of a name it holds (RFC 1035 wire format)."""

from __future__ import annotations

import socket
import struct
import threading

_HEADER = struct.Struct("!HHHHHH")
TYPE_A, CLASS_IN = 1, 1


class DnsResponder:
    def __init__(self, records: dict[str, list[str]]):
        self.records = {name.lower().rstrip("."): list(a) for name, a in records.items()}
        self._socket = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self._socket.bind(("127.0.0.1", 0))
        self.address = f"127.0.0.1:{self._socket.getsockname()[1]}"
        self._thread = threading.Thread(target=self._serve, name="dns-responder", daemon=True)
        self._closed = False

    def __enter__(self) -> DnsResponder:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._closed = True
        self._socket.close()
        self._thread.join(5)

    def _serve(self) -> None:
        while not self._closed:
            try:
                query, peer = self._socket.recvfrom(4096)
                self._socket.sendto(self.answer(query), peer)
            except OSError:  # closed
                return
            except ValueError:  # not a query we can read: no answer, as a server might
                continue

    def answer(self, query: bytes) -> bytes:
        ident, flags, qdcount, _, _, _ = _HEADER.unpack_from(query)
        if qdcount != 1:
            raise ValueError("one question per query")
        labels, offset = [], _HEADER.size
        while query[offset]:
            length = query[offset]
            labels.append(query[offset + 1 : offset + 1 + length].decode().lower())
            offset += 1 + length
        qtype, qclass = struct.unpack_from("!HH", query, offset + 1)
        question = query[_HEADER.size : offset + 5]
        name = ".".join(labels)
        records = b""
        count = 0
        addresses = self.records.get(name)
        rcode = 0 if addresses else 3  # NXDOMAIN
        if addresses and (qtype, qclass) == (TYPE_A, CLASS_IN):
            for address in addresses:
                # A pointer to the question's name, type A, class IN, TTL 1 s, 4 bytes of address.
                records += struct.pack("!HHHIH", 0xC00C, TYPE_A, CLASS_IN, 1, 4)
                records += socket.inet_aton(address)
                count += 1
        response_flags = 0x8000 | 0x0400 | (flags & 0x0100) | 0x0080 | rcode  # QR AA RD RA
        return _HEADER.pack(ident, response_flags, 1, count, 0, 0) + question + records
