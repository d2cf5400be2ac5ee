"""A local HTTP endpoint that answers every request after a fixed delay
(20 ms by default), for the outbox benchmark; and a client that measures
the same endpoint's ceiling at a given concurrency without the database.

  python3 slow_endpoint.py serve PORT [DELAY_MS [ARRIVALS_LOG]]
  python3 slow_endpoint.py load PORT CONCURRENCY SECONDS   -> prints requests/s

With ARRIVALS_LOG (for the commit -> wire latency, at low load) a thread
serves each connection instead, and each request that carries an
Idempotency-Key is noted there as "<key> <unix time>", the time the kernel
received its first bytes (SO_TIMESTAMPNS: when it was on the wire, whatever
this process's own scheduling).
"""
import asyncio
import itertools
import socket
import struct
import sys
import threading
import time

ids = itertools.count(1)
SO_TIMESTAMPNS = getattr(socket, "SO_TIMESTAMPNS", 35)   # (Linux; not named by every Python)


def answer():
    body = b'{"id":"cus_bench%d","object":"customer"}' % next(ids)
    return (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
            % (len(body), body))


async def handle(reader, writer, delay):
    try:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            length = 0
            for line in head.split(b"\r\n"):
                if line.lower().startswith(b"content-length:"):
                    length = int(line.split(b":", 1)[1])
            if length:
                await reader.readexactly(length)
            await asyncio.sleep(delay)
            writer.write(answer())
            await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError):
        pass
    finally:
        writer.close()


async def serve(port, delay):
    server = await asyncio.start_server(lambda r, w: handle(r, w, delay), "127.0.0.1", port, backlog=1024)
    print(f"listening on {port}", flush=True)
    async with server:
        await server.serve_forever()


def serve_stamped(port, delay, log_path):
    log = open(log_path, "a", buffering=1)
    lock = threading.Lock()

    def connection(c):
        c.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
        buf, first = b"", None
        with c:
            while True:
                try:
                    data, anc, _, _ = c.recvmsg(65536, 256)
                except OSError:
                    return
                if not data:
                    return
                stamp = None
                for level, kind, d in anc:
                    if level == socket.SOL_SOCKET and kind == SO_TIMESTAMPNS:
                        sec, nsec = struct.unpack("qq", d[:16])
                        stamp = sec + nsec / 1e9
                if not buf:
                    first = stamp       # a request's first bytes
                buf += data
                while b"\r\n\r\n" in buf:
                    head, rest = buf.split(b"\r\n\r\n", 1)
                    lines = head.split(b"\r\n")
                    length = sum(int(l.split(b":", 1)[1]) for l in lines if l.lower().startswith(b"content-length:"))
                    if len(rest) < length:
                        break
                    buf = rest[length:]
                    for l in lines:
                        if l.lower().startswith(b"idempotency-key:") and first is not None:
                            with lock:
                                log.write("%s %.6f\n" % (l.split(b":", 1)[1].strip().decode(), first))
                    time.sleep(delay)
                    try:
                        c.sendall(answer())
                    except OSError:
                        return
                    first = stamp if buf else None

    srv = socket.socket()
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)   # (accepted sockets inherit it)
    srv.bind(("127.0.0.1", port))
    srv.listen(128)
    print(f"listening on {port}", flush=True)
    while True:
        c, _ = srv.accept()
        threading.Thread(target=connection, args=(c,), daemon=True).start()


async def load(port, concurrency, seconds):
    done = 0
    deadline = time.monotonic() + seconds
    body = b"name=Bench&metadata%5Bn%5D=1"
    req = (b"POST /v1/customers HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer sk_test_bench\r\n"
           b"Content-Type: application/x-www-form-urlencoded\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))

    async def one():
        nonlocal done
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        while time.monotonic() < deadline:
            writer.write(req)
            await writer.drain()
            head = await reader.readuntil(b"\r\n\r\n")
            length = int([x for x in head.split(b"\r\n") if x.lower().startswith(b"content-length:")][0].split(b":")[1])
            await reader.readexactly(length)
            done += 1
        writer.close()

    start = time.monotonic()
    await asyncio.gather(*(one() for _ in range(concurrency)))
    print(int(done / (time.monotonic() - start)))


if __name__ == "__main__":
    if sys.argv[1] == "serve":
        delay = float(sys.argv[3] if len(sys.argv) > 3 else 20) / 1000
        if len(sys.argv) > 4:
            serve_stamped(int(sys.argv[2]), delay, sys.argv[4])
        else:
            asyncio.run(serve(int(sys.argv[2]), delay))
    else:
        asyncio.run(load(int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])))
