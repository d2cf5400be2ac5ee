"""A local HTTP endpoint that answers every request after a fixed delay
(20 ms by default), for the outbox benchmark; and a client that measures
the same endpoint's ceiling at a given concurrency without the database.

  python3 slow_endpoint.py serve PORT [DELAY_MS]
  python3 slow_endpoint.py load PORT CONCURRENCY SECONDS   -> prints requests/s
"""
import asyncio
import itertools
import sys
import time

ids = itertools.count(1)


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
            body = b'{"id":"cus_bench%d","object":"customer"}' % next(ids)
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
                         % (len(body), body))
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
        asyncio.run(serve(int(sys.argv[2]), float(sys.argv[3] if len(sys.argv) > 3 else 20) / 1000))
    else:
        asyncio.run(load(int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])))
