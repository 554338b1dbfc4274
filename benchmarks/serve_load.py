"""Load test for `encdec serve`: N concurrent clients on loopback for a bounded time.

    python benchmarks/serve_load.py RUN [--clients 200] [--seconds 60] [--modes batched,single]
                                        [--hostile 0] [--out results.json]

For each mode a fresh server is started on a free port: ``batched`` with the run's serve
settings (dynamic batching), ``single`` with ``serve.max_batch_size=1`` (one request at a time,
the reference). Every client keeps one HTTP/1.1 connection open and sends one input per request
(words or sentences from the run's test split, in turn), using the run's decoding defaults.
Printed per mode: requests/s, p50/p90/p99 latency, errors, and the ratio of requests/s against
the single mode. ``--hostile K`` adds K clients that send malformed JSON, wrong types, too many
inputs and oversized bodies (``--hostile-rate`` per second each; 0 = as fast as they can), to
show what bad traffic costs the others.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
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


async def request(reader, writer, body: bytes) -> tuple[int, bytes]:
    writer.write(b"POST /v1/translate HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                 b"Content-Type: application/json\r\nContent-Length: "
                 + str(len(body)).encode() + b"\r\n\r\n" + body)
    await writer.drain()
    status = int((await reader.readline()).split()[1])
    length, close = 0, False
    while True:
        line = await reader.readline()
        if line in (b"\r\n", b""):
            break
        name, _, value = line.decode("latin-1").partition(":")
        if name.lower() == "content-length":
            length = int(value)
        elif name.lower() == "connection" and value.strip().lower() == "close":
            close = True
    payload = await reader.readexactly(length)
    if close:
        raise ConnectionResetError("server closed the connection")
    return status, payload


async def client(port: int, bodies, stop_at: float, latencies: list, errors: list,
                 timeout: float, rate: float = 0.0) -> None:
    """Requests back to back, or at most ``rate`` per second when rate > 0."""
    reader = writer = None
    next_at = time.perf_counter()
    while time.perf_counter() < stop_at:
        if rate > 0:
            next_at += 1.0 / rate
            await asyncio.sleep(max(0.0, next_at - time.perf_counter()))
        body = next(bodies)
        try:
            if writer is None:
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
            t0 = time.perf_counter()
            status, payload = await asyncio.wait_for(request(reader, writer, body), timeout)
            if status == 200:
                latencies.append(time.perf_counter() - t0)
            else:
                errors.append(f"HTTP {status}: {payload[:200]!r}")
        except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError, ValueError,
                IndexError) as err:
            errors.append(f"{type(err).__name__}: {err}")
            if writer is not None:
                writer.close()
            reader = writer = None
    if writer is not None:
        writer.close()


def hostile_bodies():
    bad = [b'{"inputs": ["abc"', b'{"inputs": "abc"}', b'{"inputs": ["a"], "beam": "x"}',
           json.dumps({"inputs": ["a"] * 1000}).encode(), b'{"inputs": []}',
           json.dumps({"inputs": ["x" * 5000]}).encode(), b"\xff\xfe\x00",
           json.dumps({"inputs": ["y" * 900] * 2000}).encode()]  # ~1.8 MB: over the body limit
    return itertools.cycle(bad)


async def load(port: int, texts: list[str], clients: int, hostile: int, seconds: float,
               timeout: float, hostile_rate: float = 0.0) -> dict:
    bodies = itertools.cycle([json.dumps({"inputs": [t]}).encode() for t in texts])
    latencies: list[float] = []
    errors: list[str] = []
    refused: list[str] = []
    junk: list[float] = []
    start = time.perf_counter()
    stop_at = start + seconds
    tasks = [client(port, bodies, stop_at, latencies, errors, timeout) for _ in range(clients)]
    tasks += [client(port, hostile_bodies(), stop_at, junk, refused, timeout, hostile_rate)
              for _ in range(hostile)]
    await asyncio.gather(*tasks)
    elapsed = time.perf_counter() - start
    lat = sorted(latencies)

    def pct(p):
        return lat[min(len(lat) - 1, int(p / 100 * len(lat)))] * 1000 if lat else float("nan")

    return {"requests": len(lat), "seconds": round(elapsed, 2),
            "requests_per_s": len(lat) / elapsed, "p50_ms": pct(50), "p90_ms": pct(90),
            "p99_ms": pct(99), "max_ms": lat[-1] * 1000 if lat else float("nan"),
            "mean_ms": statistics.fmean(lat) * 1000 if lat else float("nan"),
            "errors": len(errors), "error_examples": sorted(set(errors))[:5],
            "hostile_requests": len(refused) + len(junk),
            "hostile_refused": len(refused)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("run")
    ap.add_argument("--clients", type=int, default=200)
    ap.add_argument("--seconds", type=float, default=60)
    ap.add_argument("--modes", default="batched,single",
                    help="comma-separated: batched (dynamic batching), single (batch size 1)")
    ap.add_argument("--hostile", type=int, default=0, help="clients sending bad requests")
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
    modes = {"batched": [], "single": ["serve.max_batch_size=1"]}
    results = {}
    for mode in args.modes.split(","):
        port = free_port()
        # Enough queue for every client's request at once: nothing is refused for load.
        overrides = [f"serve.max_queue={max(2048, 4 * args.clients)}", *args.serve, *modes[mode]]
        server = start_server(args.run, port, overrides, args.threads)
        try:
            asyncio.run(load(port, texts, min(8, args.clients), 0, 3, args.timeout))  # warm up
            res = asyncio.run(load(port, texts, args.clients, args.hostile, args.seconds,
                                   args.timeout, args.hostile_rate))
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/health", timeout=10) as r:
                health = json.loads(r.read())
            res["server_alive_after"] = health["status"] == "ok"
            res["mean_batch_inputs"] = health["decoded_inputs"] / max(health["batches"], 1)
        finally:
            server.terminate()
            server.wait(timeout=30)
        results[mode] = res
        print(f"{mode:>8}: {res['requests_per_s']:7.1f} req/s  p50 {res['p50_ms']:7.0f} ms  "
              f"p90 {res['p90_ms']:7.0f} ms  p99 {res['p99_ms']:7.0f} ms  errors {res['errors']}  "
              f"mean batch {res['mean_batch_inputs']:.1f} inputs"
              + (f"  hostile requests {res['hostile_requests']} "
                 f"(refused {res['hostile_refused']})" if args.hostile else ""), flush=True)
        for example in res["error_examples"]:
            print(f"          error: {example}")
    if "batched" in results and "single" in results:
        ratio = results["batched"]["requests_per_s"] / results["single"]["requests_per_s"]
        results["ratio"] = ratio
        print(f"dynamic batching: {ratio:.2f}x the requests/s of batch-size-1 serving "
              f"({args.clients} clients, {args.seconds:g} s, {len(texts)} distinct inputs)")
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
