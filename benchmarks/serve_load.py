"""Load test for `encdec serve`: N concurrent clients on loopback for a bounded time.

    python benchmarks/serve_load.py RUN [--clients 200] [--seconds 60] [--modes batched,single]
                                        [--repeats 1] [--hostile 0] [--out results.json]

For each mode a fresh server is started on a free port: ``batched`` with the run's serve
settings (dynamic batching), ``single`` with ``serve.max_batch_size=1`` (one request at a time,
the reference). Every client keeps one HTTP/1.1 connection open (a new one when the server
closes it) and sends one input per request (words or sentences from the run's test split, in
turn), using the run's decoding defaults. Each client connects from its own loopback address
(127.1.x.y; hostile ones 127.2.x.y), so a per-address rate limit sees separate clients.

Printed per mode: requests/s, p50/p90/p99 latency of the answered (200) requests, the ratio of
requests/s against the single mode, and the responses counted by status (200, 401, 413, 422,
429, 500, 503, other), with refusals (4xx) apart from server errors (5xx) and transport errors.

``--hostile K`` adds K clients that send malformed JSON, wrong types, too many inputs and
oversized bodies (``--hostile-rate`` per second each; 0 = as fast as they can, a flood), to show
what bad traffic costs the others. They run in a process of their own at the lowest CPU
priority: on a 2-core machine they stand for clients elsewhere, so the figures show what the
server spends on their requests, not what the load generator spends making them. Try it with
and without ``--serve serve.rate_limit=R serve.rate_burst=B``.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import itertools
import json
import multiprocessing
import os
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(run: str, port: int, overrides: list[str], threads: int) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "encdec.cli", "serve", run, "--port", str(port),
           "--threads", str(threads), *overrides]
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/health", timeout=2) as r:
                if r.status == 200:
                    return proc
        except OSError:
            if proc.poll() is not None:
                raise SystemExit(f"server exited: {proc.stderr.read().decode()}")
            time.sleep(0.3)
    proc.kill()
    raise SystemExit("server did not start within 120 s")


STATUSES = (200, 401, 413, 422, 429, 500, 503)
CHUNK = 64 * 1024


class Connection:
    """One HTTP/1.1 connection on a non-blocking socket. Not asyncio streams: those close the
    socket when a write fails, losing an answer the server sent before closing (a 413 for a
    body it would not read); here the socket stays open and the answer can still be read."""

    def __init__(self, sock: socket.socket):
        self.sock, self.buffer = sock, bytearray()
        self.loop = asyncio.get_running_loop()

    @classmethod
    async def open(cls, port: int, address: str) -> "Connection":
        sock = socket.socket()
        sock.setblocking(False)
        try:
            sock.bind((address, 0))
            await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
        except BaseException:
            sock.close()
            raise
        return cls(sock)

    async def send(self, data: bytes) -> None:
        """Send in chunks; stop when the server has answered (or closed) before the end."""
        for start in range(0, len(data), CHUNK):
            if self._answered():
                return
            await self.loop.sock_sendall(self.sock, data[start:start + CHUNK])

    def _answered(self) -> bool:
        try:
            chunk = self.sock.recv(CHUNK)
        except BlockingIOError:
            return False
        self.buffer += chunk
        return True  # an answer, or b"": the server closed

    async def readline(self) -> bytes:
        while (end := self.buffer.find(b"\n")) < 0:
            await self._fill()
        line = bytes(self.buffer[:end + 1])
        del self.buffer[:end + 1]
        return line

    async def readexactly(self, n: int) -> bytes:
        while len(self.buffer) < n:
            await self._fill()
        data = bytes(self.buffer[:n])
        del self.buffer[:n]
        return data

    async def _fill(self) -> None:
        chunk = await self.loop.sock_recv(self.sock, CHUNK)
        if not chunk:
            raise asyncio.IncompleteReadError(bytes(self.buffer), None)
        self.buffer += chunk

    def close(self) -> None:
        self.sock.close()


async def read_response(conn: Connection) -> tuple[int, dict, bytes]:
    """(status, headers with lower-case names, body)."""
    status = int((await conn.readline()).split()[1])
    headers = {}
    while True:
        line = await conn.readline()
        if line in (b"\r\n", b""):
            break
        name, _, value = line.decode("latin-1").partition(":")
        headers[name.strip().lower()] = value.strip()
    return status, headers, await conn.readexactly(int(headers.get("content-length", 0)))


async def request(conn: Connection, body: bytes) -> tuple[int, dict, bytes]:
    """One POST. A server may refuse a body before reading it (413, 401, 429) and close the
    connection; our writes then fail, but its answer is there to read and counts."""
    try:
        await conn.send(b"POST /v1/translate HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                        b"Content-Type: application/json\r\nContent-Length: "
                        + str(len(body)).encode() + b"\r\n\r\n" + body)
    except OSError:  # reset or broken pipe: the server closed first; read what it said
        pass
    return await read_response(conn)


def status_class(status: int) -> str:
    if status in STATUSES:
        return str(status)
    return {4: "other 4xx", 5: "other 5xx"}.get(status // 100, "other")


def summary(counts: collections.Counter) -> dict:
    """Refusals (4xx: the server said no to the request) apart from server errors (5xx)."""
    return {"statuses": dict(sorted(counts.items())),
            "refused": sum(n for k, n in counts.items() if k.startswith("4")),
            "server_errors": sum(n for k, n in counts.items() if k.startswith("5")),
            "transport_errors": counts["transport"]}


async def client(port: int, address: str, bodies, stop_at: float, latencies: list,
                 counts: collections.Counter, examples: dict, timeout: float,
                 rate: float = 0.0, polite: bool = True) -> None:
    """Requests back to back, or at most ``rate`` per second when rate > 0; latencies of the
    200s, every answer counted by status (transport failures as "transport"). A ``polite``
    client waits as long as a 429's Retry-After says."""
    conn = None
    next_at = time.perf_counter()
    while time.perf_counter() < stop_at:
        if rate > 0:
            next_at += 1.0 / rate
            await asyncio.sleep(max(0.0, next_at - time.perf_counter()))
        body = next(bodies)
        try:
            if conn is None:
                conn = await Connection.open(port, address)
            t0 = time.perf_counter()
            status, headers, payload = await asyncio.wait_for(request(conn, body), timeout)
            counts[status_class(status)] += 1
            close = headers.get("connection", "").lower() == "close"
            if status == 200:
                latencies.append(time.perf_counter() - t0)
            else:
                examples.setdefault(status, payload[:200].decode("utf-8", "replace"))
            if status == 429 and polite:
                await asyncio.sleep(float(headers.get("retry-after", 1)))
        except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError, ValueError,
                IndexError) as err:
            counts["transport"] += 1
            examples.setdefault("transport", f"{type(err).__name__}: {err}")
            close = True
        if close and conn is not None:
            conn.close()
            conn = None
    if conn is not None:
        conn.close()


def address(group: int, i: int) -> str:
    """A loopback address of its own per client: 127.<group>.<i // 250>.<i % 250 + 1>."""
    return f"127.{group}.{i // 250}.{i % 250 + 1}"


def hostile_bodies():
    bad = [b'{"inputs": ["abc"', b'{"inputs": "abc"}', b'{"inputs": ["a"], "beam": "x"}',
           json.dumps({"inputs": ["a"] * 1000}).encode(), b'{"inputs": []}',
           json.dumps({"inputs": ["x" * 5000]}).encode(), b"\xff\xfe\x00",
           json.dumps({"inputs": ["y" * 900] * 2000}).encode()]  # ~1.8 MB: over the body limit
    return itertools.cycle(bad)


def hostile_clients(port: int, n: int, stop_wall: float, timeout: float, rate: float,
                    results) -> None:
    """In a process of its own, at the lowest priority: ``n`` hostile clients until
    ``stop_wall`` (time.time()); sends their counts by status to ``results`` (a Pipe end)."""
    os.nice(19)
    counts: collections.Counter = collections.Counter()
    examples: dict = {}

    async def run():
        stop_at = time.perf_counter() + stop_wall - time.time()
        await asyncio.gather(*(client(port, address(2, i), hostile_bodies(), stop_at, [], counts,
                                      examples, timeout, rate, polite=False) for i in range(n)))

    asyncio.run(run())
    results.send((counts, examples))


async def load(port: int, texts: list[str], clients: int, hostile: int, seconds: float,
               timeout: float, hostile_rate: float = 0.0) -> dict:
    bodies = itertools.cycle([json.dumps({"inputs": [t]}).encode() for t in texts])
    latencies: list[float] = []
    counts: collections.Counter = collections.Counter()
    examples: dict = {}
    if hostile:
        ctx = multiprocessing.get_context("spawn")
        receiver, sender = ctx.Pipe(duplex=False)
        flood = ctx.Process(target=hostile_clients, daemon=True, args=(
            port, hostile, time.time() + seconds, timeout, hostile_rate, sender))
        flood.start()
    start = time.perf_counter()
    await asyncio.gather(*(client(port, address(1, i), bodies, start + seconds, latencies, counts,
                                  examples, timeout) for i in range(clients)))
    elapsed = time.perf_counter() - start
    lat = sorted(latencies)

    def pct(p):
        return lat[min(len(lat) - 1, int(p / 100 * len(lat)))] * 1000 if lat else float("nan")

    good = summary(counts)
    res = {"requests": len(lat), "seconds": round(elapsed, 2),
           "requests_per_s": len(lat) / elapsed, "p50_ms": pct(50), "p90_ms": pct(90),
           "p99_ms": pct(99), "max_ms": lat[-1] * 1000 if lat else float("nan"),
           "mean_ms": statistics.fmean(lat) * 1000 if lat else float("nan"), **good,
           "errors": good["refused"] + good["server_errors"] + good["transport_errors"],
           "error_examples": [f"{k}: {v}" for k, v in sorted(examples.items(), key=str)]}
    if hostile:
        hostile_counts, hostile_examples = receiver.recv()
        flood.join(timeout=30)
        res["hostile"] = {"requests": sum(hostile_counts.values()), **summary(hostile_counts),
                          "examples": [f"{k}: {v}" for k, v in
                                       sorted(hostile_examples.items(), key=str)]}
    return res


def describe(counts: dict) -> str:
    statuses = "  ".join(f"{k} {n}" for k, n in counts["statuses"].items())
    return (f"{statuses or 'none'} | refused (4xx) {counts['refused']}, server errors (5xx) "
            f"{counts['server_errors']}, transport errors {counts['transport_errors']}")


def measure(args, texts: list[str], mode: str, hostile: int) -> dict:
    """A fresh server for ``mode``; warm up, then the clients (and ``hostile`` bad ones)."""
    port = free_port()
    # Enough queue for every client's request at once: nothing is refused for load.
    overrides = [f"serve.max_queue={max(2048, 4 * args.clients)}", *args.serve, *MODES[mode]]
    server = start_server(args.run, port, overrides, args.threads)
    try:
        asyncio.run(load(port, texts, min(8, args.clients), 0, 3, args.timeout))  # warm up
        res = asyncio.run(load(port, texts, args.clients, hostile, args.seconds, args.timeout,
                               args.hostile_rate))
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/health", timeout=10) as r:
            health = json.loads(r.read())
        res["server_alive_after"] = health["status"] == "ok"
        res["mean_batch_inputs"] = health["decoded_inputs"] / max(health["batches"], 1)
    finally:
        server.terminate()
        server.wait(timeout=30)
    return res


def report(label: str, res: dict) -> None:
    print(f"{label:>16}: {res['requests_per_s']:7.1f} req/s  p50 {res['p50_ms']:7.0f} ms  "
          f"p90 {res['p90_ms']:7.0f} ms  p99 {res['p99_ms']:7.0f} ms  "
          f"mean batch {res['mean_batch_inputs']:.1f} inputs", flush=True)
    print(f"{'good':>22}: {describe(res)}")
    for example in res["error_examples"]:
        print(f"{'':>24}{example}")
    if "hostile" in res:
        print(f"{'hostile':>22}: {res['hostile']['requests']} requests: "
              f"{describe(res['hostile'])}", flush=True)


def median(runs: list[dict]) -> dict:
    keys = ("requests_per_s", "p50_ms", "p90_ms", "p99_ms", "mean_batch_inputs")
    return {k: statistics.median(r[k] for r in runs) for k in keys} | {"runs": runs}


MODES = {"batched": [], "single": ["serve.max_batch_size=1"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("run")
    ap.add_argument("--clients", type=int, default=200)
    ap.add_argument("--seconds", type=float, default=60)
    ap.add_argument("--modes", default="batched,single",
                    help="comma-separated: batched (dynamic batching), single (batch size 1)")
    ap.add_argument("--repeats", type=int, default=1,
                    help="runs per mode, each on a fresh server; medians are reported")
    ap.add_argument("--hostile", type=int, default=0,
                    help="clients sending bad requests, from a process of their own at nice 19; "
                         "each run then has a quiet reference run (no hostile clients) before it")
    ap.add_argument("--hostile-rate", type=float, default=10.0,
                    help="bad requests per second per hostile client (0: as fast as possible)")
    ap.add_argument("--threads", type=int, default=2, help="server CPU threads")
    ap.add_argument("--timeout", type=float, default=120, help="client timeout per request (s)")
    ap.add_argument("--serve", nargs="*", default=[], help="extra serve.* overrides for all modes")
    ap.add_argument("--inputs", help="file of inputs, one per line (default: the test split of "
                                     "the run's data directory)")
    ap.add_argument("--out", help="write the results as JSON here")
    args = ap.parse_args()

    sys.path.insert(0, str(ROOT))
    from encdec.config import Config
    from encdec.data.dataset import read_eval

    if args.inputs:
        texts = [t for t in Path(args.inputs).read_text(encoding="utf-8").splitlines() if t]
    else:
        cfg = Config.load(Path(args.run) / "config.yaml")
        texts = [e["src"] for e in read_eval(cfg.data.dir, "test")]
    results = {}
    for mode in args.modes.split(","):
        quiet, loud = [], []
        for _ in range(args.repeats):
            if args.hostile:
                quiet.append(measure(args, texts, mode, 0))
                report(f"{mode}, quiet", quiet[-1])
            loud.append(measure(args, texts, mode, args.hostile))
            report(f"{mode}, {args.hostile} hostile" if args.hostile else mode, loud[-1])
        results[mode] = median(loud)
        line = (f"{mode}: median of {len(loud)}: {results[mode]['requests_per_s']:.1f} req/s, "
                f"p99 {results[mode]['p99_ms']:.0f} ms")
        if args.hostile:
            results[mode]["quiet"] = median(quiet)
            ratio = results[mode]["p99_ms"] / results[mode]["quiet"]["p99_ms"]
            results[mode]["p99_ratio"] = ratio
            quiet_p99 = results[mode]["quiet"]["p99_ms"]
            line += (f" with {args.hostile} hostile clients vs {quiet_p99:.0f} ms quiet: "
                     f"{ratio:.2f}x the quiet p99")
        print(line, flush=True)
    if "batched" in results and "single" in results:
        ratio = results["batched"]["requests_per_s"] / results["single"]["requests_per_s"]
        results["ratio"] = ratio
        print(f"dynamic batching: {ratio:.2f}x the requests/s of batch-size-1 serving "
              f"({args.clients} clients, {args.seconds:g} s, {len(texts)} distinct inputs)")
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
