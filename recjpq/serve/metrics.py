"""Server metrics in the Prometheus text exposition format (version 0.0.4), without a client
library: request counts by endpoint and status, a request latency histogram and a batch-size
histogram. Updated only from the event loop thread, so no locking.
"""
from __future__ import annotations

import bisect
import collections

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
LATENCY_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)


class Histogram:
    """Cumulative-bucket histogram (Prometheus semantics: ``le`` = less than or equal)."""

    def __init__(self, buckets):
        self.buckets = tuple(buckets)
        self.counts = [0] * (len(self.buckets) + 1)  # last: above every bucket (+Inf only)
        self.total = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.total += value

    def lines(self, name: str, labels: str = "") -> list[str]:
        sep = "," if labels else ""
        out, cumulative = [], 0
        for bound, count in zip((*self.buckets, "+Inf"), self.counts):
            cumulative += count
            out.append(f'{name}_bucket{{{labels}{sep}le="{bound}"}} {cumulative}')
        braces = f"{{{labels}}}" if labels else ""
        out.append(f"{name}_sum{braces} {self.total:.6f}")
        out.append(f"{name}_count{braces} {cumulative}")
        return out


class Metrics:
    def __init__(self):
        self.requests = collections.Counter()  # (endpoint, status) -> count
        self.latency = collections.defaultdict(lambda: Histogram(LATENCY_BUCKETS_S))  # endpoint -> seconds
        self.batch_size = Histogram(BATCH_SIZE_BUCKETS)

    def observe_request(self, endpoint: str, status: int, seconds: float) -> None:
        self.requests[endpoint, status] += 1
        self.latency[endpoint].observe(seconds)

    def render(self) -> str:
        lines = ["# HELP recjpq_requests_total HTTP requests by endpoint and status code.",
                 "# TYPE recjpq_requests_total counter"]
        lines += [f'recjpq_requests_total{{endpoint="{e}",status="{s}"}} {n}'
                  for (e, s), n in sorted(self.requests.items())]
        lines += ["# HELP recjpq_request_latency_seconds Time from request arrival to the end of the response.",
                  "# TYPE recjpq_request_latency_seconds histogram"]
        for endpoint, hist in sorted(self.latency.items()):
            lines += hist.lines("recjpq_request_latency_seconds", f'endpoint="{endpoint}"')
        lines += ["# HELP recjpq_batch_size Queries per model forward + top-k.",
                  "# TYPE recjpq_batch_size histogram"]
        lines += self.batch_size.lines("recjpq_batch_size")
        return "\n".join(lines) + "\n"
