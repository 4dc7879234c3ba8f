"""Building blocks for the benchmarks: CPU and memory of processes from /proc, percentiles, raw Kubernetes
watches, paced creation and the tables in docs/benchmarks.md."""

from __future__ import annotations

import json
import math
import os
import re
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kubernetes.client import ApiClient
from kubernetes.client.exceptions import ApiException
from kubernetes.watch.watch import iter_resp_lines

CLK_TCK = os.sysconf("SC_CLK_TCK")


# --- processes ---------------------------------------------------------------------------------------------------


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process (its own threads, not its children), in seconds."""
    data = Path(f"/proc/{pid}/stat").read_text()
    fields = data[data.rindex(")") + 2 :].split()  # fields from the 3rd (state) on; comm may hold spaces
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


class CpuWindow:
    """CPU use of named processes between `start()` and `stop()`, in percent of one core."""

    def __init__(self, pids: dict[str, int]) -> None:
        self.pids = pids
        self.t0 = 0.0
        self.c0: dict[str, float] = {}

    def start(self) -> CpuWindow:
        self.t0 = time.monotonic()
        self.c0 = {name: cpu_seconds(pid) for name, pid in self.pids.items()}
        return self

    def stop(self) -> dict[str, float]:
        elapsed = time.monotonic() - self.t0
        return {name: 100 * (cpu_seconds(pid) - self.c0[name]) / elapsed for name, pid in self.pids.items()}


def measure_cpu(pids: dict[str, int], seconds: float) -> dict[str, float]:
    window = CpuWindow(pids).start()
    time.sleep(seconds)
    return window.stop()


class RssSampler(threading.Thread):
    """The largest resident set size of a process, sampled every second while running."""

    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.pid = pid
        self.peak = 0.0
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.is_set():
            try:
                self.peak = max(self.peak, rss_mb(self.pid))
            except OSError:
                return
            self._stop_event.wait(1.0)

    def stop(self) -> float:
        self._stop_event.set()
        self.join(5)
        return self.peak


def machine() -> str:
    model = ""
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            model = re.sub(r"\s+", " ", line.split(":", 1)[1]).strip()
            break
    mem_kb = int(Path("/proc/meminfo").read_text().split()[1])
    load = os.getloadavg()[0]
    return f"{os.cpu_count()} cores ({model}), {mem_kb / 2**20:.0f} GiB, load {load:.1f} at start"


# --- statistics --------------------------------------------------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100); missing samples are passed as math.inf and count as slowest."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


def fmt_s(value: float) -> str:
    if math.isnan(value):
        return "n/a"
    if math.isinf(value):
        return "never"
    return f"{value:.2f} s" if value < 10 else f"{value:.1f} s"


# --- Kubernetes --------------------------------------------------------------------------------------------------


def raw_request(api: ApiClient, path: str, query: Iterable[tuple[str, str]] = (), timeout: float = 120) -> Any:
    """GET a path; returns the urllib3 response (not read yet). Non-2xx raises ApiException."""
    method, url, headers, _, _ = api.param_serialize(
        "GET",
        path,
        query_params=list(query),
        header_params={"Accept": "application/json"},
        auth_settings=["BearerToken"],
    )
    resp = api.call_api(method, url, header_params=headers, _request_timeout=timeout)
    if not 200 <= resp.status <= 299:
        resp.read()
        raise ApiException.from_response(http_resp=resp, body=None, data=None)
    return resp.response


def raw_get(api: ApiClient, path: str, query: Iterable[tuple[str, str]] = ()) -> dict[str, Any]:
    """GET a path as JSON, without the client's model (de)serialisation (cheap for large lists)."""
    result: dict[str, Any] = json.loads(raw_request(api, path, query).data)
    return result


def list_all(api: ApiClient, path: str, query: Iterable[tuple[str, str]] = ()) -> list[dict[str, Any]]:
    """Every item of a collection, in pages of 500."""
    items: list[dict[str, Any]] = []
    token = ""
    while True:
        page = raw_get(api, path, [*query, ("limit", "500"), *([("continue", token)] if token else [])])
        items.extend(page.get("items") or [])
        token = (page.get("metadata") or {}).get("continue") or ""
        if not token:
            return items


class Watch(threading.Thread):
    """A watch on a collection path that calls `on_event(type, object, monotonic receive time)` per event.

    It starts at the collection's current resourceVersion (nothing that exists is replayed, nothing created
    after `ready` is missed) and reconnects every few seconds, so `stop()` returns quickly.
    """

    def __init__(
        self,
        api: ApiClient,
        path: str,
        on_event: Callable[[str, dict[str, Any], float], None],
        query: Sequence[tuple[str, str]] = (),
    ) -> None:
        super().__init__(daemon=True, name=f"watch {path}")
        self.api = api
        self.path = path
        self.query = list(query)
        self.on_event = on_event
        self.ready = threading.Event()
        self.errors: list[str] = []
        self.relists = 0
        self._stop_event = threading.Event()

    def _current_rv(self) -> str:
        return str(raw_get(self.api, self.path, [*self.query, ("limit", "1")])["metadata"]["resourceVersion"])

    def run(self) -> None:
        rv = self._current_rv()
        while not self._stop_event.is_set():
            try:
                resp = raw_request(
                    self.api,
                    self.path,
                    [
                        *self.query,
                        ("watch", "true"),
                        ("resourceVersion", rv),
                        ("timeoutSeconds", "5"),
                        ("allowWatchBookmarks", "true"),
                    ],
                    timeout=60,
                )
                self.ready.set()
                try:
                    for line in iter_resp_lines(resp):
                        t = time.monotonic()
                        event = json.loads(line)
                        kind, obj = event["type"], event["object"]
                        if kind == "ERROR":
                            if obj.get("code") == 410:  # too old: start again from now (events may be lost)
                                self.relists += 1
                                rv = self._current_rv()
                                break
                            raise RuntimeError(f"watch error: {obj}")
                        rv = obj["metadata"]["resourceVersion"]
                        if kind != "BOOKMARK":
                            self.on_event(kind, obj, t)
                finally:
                    resp.release_conn()
            except Exception as exc:  # a broken stream: note it and reconnect from the last version seen
                self.errors.append(f"{type(exc).__name__}: {exc}")
                self._stop_event.wait(0.5)

    def stop(self) -> None:
        self._stop_event.set()
        self.join(15)


def paced(count: int, rate: float, fn: Callable[[int], None], workers: int = 8) -> tuple[float, list[str]]:
    """Call fn(0..count-1), the i-th no earlier than i/rate seconds after the start, from a thread pool.

    Returns the achieved rate (calls started per second) and the errors raised.
    """
    errors: list[str] = []
    started: list[float] = []
    lock = threading.Lock()

    def call(i: int) -> None:
        with lock:
            started.append(time.monotonic())
        try:
            fn(i)
        except Exception as exc:
            with lock:
                errors.append(f"#{i}: {type(exc).__name__}: {str(exc)[:300]}")

    with ThreadPoolExecutor(max_workers=workers) as pool:
        t0 = time.monotonic()
        for i in range(count):
            delay = t0 + i / rate - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            pool.submit(call, i)
    span = max(started) - min(started) if len(started) > 1 else 0.0
    return ((len(started) - 1) / span if span > 0 else math.inf), errors


# --- docs/benchmarks.md ------------------------------------------------------------------------------------------


@dataclass
class Row:
    scenario: str
    what: str
    target: str
    measured: str
    ok: bool | None  # None: recorded only, no target

    @property
    def verdict(self) -> str:
        return "" if self.ok is None else ("meets" if self.ok else "MISSES")


def markdown_table(rows: Sequence[Row], date: str, host: str, command: str) -> str:
    head = "| scenario | what | target | measured | verdict | date (UTC) | machine | command |\n" + "| --- " * 8 + "|"
    cell = lambda s: s.replace("|", "\\|")  # noqa: E731
    lines = [
        f"| {cell(r.scenario)} | {cell(r.what)} | {cell(r.target)} | {cell(r.measured)} | {r.verdict} | {date} | "
        f"{cell(host)} | `{cell(command)}` |"
        for r in rows
    ]
    return "\n".join([head, *lines])


def text_table(rows: Sequence[Row]) -> str:
    widths = [max(len(h), *(len(v) for v in col)) for h, col in _columns(rows)]
    out = []
    for values in [[h for h, _ in _columns(rows)], *zip(*(col for _, col in _columns(rows)), strict=True)]:
        out.append("  ".join(v.ljust(w) for v, w in zip(values, widths, strict=True)).rstrip())
    out.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(out)


def _columns(rows: Sequence[Row]) -> list[tuple[str, list[str]]]:
    return [
        ("scenario", [r.scenario for r in rows]),
        ("what", [r.what for r in rows]),
        ("target", [r.target for r in rows]),
        ("measured", [r.measured for r in rows]),
        ("verdict", [r.verdict for r in rows]),
    ]


def write_section(path: Path, name: str, body: str, title: str) -> None:
    """Replace the text between `<!-- name:begin -->` and `<!-- name:end -->` (appending the section if new)."""
    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    block = f"{begin}\n{body.rstrip()}\n{end}"
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    if begin in text and end in text:
        text = text[: text.index(begin)] + block + text[text.index(end) + len(end) :]
    else:
        text = text.rstrip() + f"\n\n## {title}\n\n{block}\n"
    path.write_text(text)
