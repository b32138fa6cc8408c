"""``recjpq serve``: a real uvicorn server on a loopback port, spoken to over HTTP with httpx."""
import asyncio
import io
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import torch

pytest.importorskip("fastapi", reason="the serve extra (fastapi) is not installed")
pytest.importorskip("uvicorn", reason="the serve extra (uvicorn) is not installed")
httpx = pytest.importorskip("httpx", reason="the serve extra (httpx) is not installed")

from recjpq.checkpoint import save_checkpoint  # noqa: E402
from recjpq.models import build_model  # noqa: E402
from recjpq.serve import MicroBatcher, Recommender, create_app, make_server  # noqa: E402
from recjpq.serve.batcher import BatcherClosed  # noqa: E402

NUM_ITEMS, MAX_LEN, MAX_K, MAX_BODY = 61, 6, 40, 4096
RAW_IDS = [str(1000 + i) for i in range(NUM_ITEMS)]  # raw id of model item i + 1


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    codes = torch.randint(0, 8, (NUM_ITEMS + 1, 3), dtype=torch.uint8)  # M=3 (odd), K=8
    model = build_model("sasrec", NUM_ITEMS, codes=codes, dim=12, item_embedding="recjpq", num_codes=8,
                        num_layers=1, num_heads=1, dropout=0.0, max_len=MAX_LEN)
    path = tmp_path_factory.mktemp("serve") / "model.pt"
    save_checkpoint(path, model, {"item_ids": RAW_IDS})
    return path


@pytest.fixture(scope="module")
def recommender(checkpoint):
    return Recommender.from_checkpoint(checkpoint, max_k=MAX_K)


class Running:
    """A uvicorn server on a free 127.0.0.1 port, in a thread."""

    def __init__(self, app):
        self.app = app
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.url = "http://127.0.0.1:%d" % self.sock.getsockname()[1]
        self.server = make_server(app, log_level="warning", graceful_timeout_s=10)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)
        self.thread.start()
        while not self.server.started:
            assert self.thread.is_alive(), "server failed to start"
            self.thread.join(0.01)

    def stop(self):
        self.server.should_exit = True
        self.thread.join(30)
        assert not self.thread.is_alive(), "server did not shut down"


@pytest.fixture(scope="module")
def server(recommender):
    running = Running(create_app(recommender, max_batch=8, max_wait_ms=1.0, max_body_bytes=MAX_BODY, max_users=5))
    yield running
    running.stop()


@pytest.fixture(scope="module")
def client(server):
    with httpx.Client(base_url=server.url, timeout=30) as c:
        yield c


def _histories(seed, count):
    rng = np.random.default_rng(seed)
    # lengths from 1 to beyond max_len (truncated by the model), repeats allowed
    return [rng.integers(1, NUM_ITEMS + 1, rng.integers(1, 3 * MAX_LEN)).tolist() for _ in range(count)]


def _direct(recommender, history, k, exclude_seen):
    """(raw ids, scores) from the model itself, the oracle for the server."""
    scores, items = recommender.model.recommend([history], k, exclude_seen=exclude_seen)
    keep = items[0] > 0
    return [RAW_IDS[i - 1] for i in items[0][keep].tolist()], scores[0][keep].tolist()


def _check(got, want):
    assert got["items"] == want[0]
    np.testing.assert_allclose(got["scores"], want[1], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("exclude_seen", [True, False])
@pytest.mark.parametrize("k", [1, 7, MAX_K])
def test_recommend_matches_model(client, recommender, k, exclude_seen):
    for history in _histories(k, 4):
        # raw ids as JSON strings and as JSON integers both name catalogue items
        raw = [RAW_IDS[i - 1] if j % 2 else int(RAW_IDS[i - 1]) for j, i in enumerate(history)]
        r = client.post("/recommend", json={"history": raw, "k": k, "exclude_seen": exclude_seen})
        assert r.status_code == 200, r.text
        _check(r.json(), _direct(recommender, history, k, exclude_seen))
        if exclude_seen:
            assert not set(r.json()["items"]) & {RAW_IDS[i - 1] for i in history}


def test_defaults_are_k10_and_exclude_seen(client, recommender):
    history = [3, 3, 9]
    r = client.post("/recommend", json={"history": [RAW_IDS[i - 1] for i in history]})
    assert r.status_code == 200, r.text
    _check(r.json(), _direct(recommender, history, 10, True))


def test_k_near_catalogue_size_returns_what_is_left(checkpoint):
    # max_k defaults above the catalogue: k = num_items with exclusions leaves fewer than k items
    rec = Recommender.from_checkpoint(checkpoint)
    history = list(range(1, 21))
    (out,) = rec.recommend([rec.query([RAW_IDS[i - 1] for i in history], NUM_ITEMS, True)])
    assert len(out.items) == NUM_ITEMS - 20
    assert sorted(out.items) == sorted(RAW_IDS[20:])
    assert out.scores == sorted(out.scores, reverse=True)


def test_batch_form_matches_model(client, recommender):
    histories = _histories(1, 5)
    r = client.post("/recommend/batch", json={"histories": [[RAW_IDS[i - 1] for i in h] for h in histories],
                                              "k": 5})
    assert r.status_code == 200, r.text
    results = r.json()["results"]
    assert len(results) == len(histories)
    for got, history in zip(results, histories):
        _check(got, _direct(recommender, history, 5, True))


@pytest.mark.parametrize("body, status, message", [
    ('{"history": [1000', 400, "malformed JSON"),
    ("", 400, "malformed JSON"),
    (b"\xff\xfe", 400, "malformed JSON"),
    ("[1000, 1001]", 422, "JSON object"),
    ('{"history": [1000], "kk": 3}', 422, "unknown field"),
    ('{"k": 3}', 422, "missing field 'history'"),
    ('{"history": []}', 422, "history is empty"),
    ('{"history": "1000"}', 422, "history must be a list"),
    ('{"history": [1000, 1.5]}', 422, "history[1]"),
    ('{"history": [1000, null]}', 422, "history[1]"),
    ('{"history": [1000, 424242, "nope"]}', 422, "unknown item id"),
    ('{"history": [0]}', 422, "unknown item id"),
    ('{"history": [1000], "k": 0}', 422, "k must lie in [1, 40]"),
    ('{"history": [1000], "k": 41}', 422, "k must lie in [1, 40]"),
    ('{"history": [1000], "k": "3"}', 422, "k must be an integer"),
    ('{"history": [1000], "k": true}', 422, "k must be an integer"),
    ('{"history": [1000], "exclude_seen": "yes"}', 422, "exclude_seen"),
])
def test_bad_single_requests(client, body, status, message):
    r = client.post("/recommend", content=body, headers={"content-type": "application/json"})
    assert r.status_code == status, r.text
    assert message in r.json()["detail"]


@pytest.mark.parametrize("payload, message", [
    ({"histories": []}, "non-empty list"),
    ({"histories": [[1000]] * 6}, "at most 5"),
    ({"histories": [[1000], []]}, "histories[1]: history is empty"),
    ({"histories": [[1000], [1001, 99]]}, "histories[1]: history has 1 unknown item id(s), e.g. [99]"),
    ({"histories": [[1000], 1001]}, "histories[1] must be a list"),
    ({"histories": [[1000]], "k": -1}, "k must lie in"),
])
def test_bad_batch_requests(client, payload, message):
    r = client.post("/recommend/batch", json=payload)
    assert r.status_code == 422, r.text
    assert message in r.json()["detail"]


def test_deeply_nested_json_is_malformed_not_a_crash(client):
    r = client.post("/recommend", content="[" * (MAX_BODY - 1))
    assert r.status_code == 400 and "malformed JSON" in r.json()["detail"]


def test_oversized_bodies_are_refused(client):
    big = b'{"history": [' + b"1000, " * MAX_BODY + b"1000]}"
    r = client.post("/recommend", content=big)  # declared by Content-Length
    assert r.status_code == 413 and "exceeds the limit of 4096 bytes" in r.json()["detail"]

    def chunks():  # no Content-Length: counted while streaming
        for start in range(0, len(big), 1000):
            yield big[start:start + 1000]

    r = client.post("/recommend", content=chunks())
    assert r.status_code == 413 and "exceeds the limit" in r.json()["detail"]


def test_long_histories_keep_the_most_recent_items(client, recommender):
    history = _histories(7, 1)[0] + list(range(1, 3 * MAX_LEN))
    tail = history[-MAX_LEN:]
    r = client.post("/recommend", json={"history": [RAW_IDS[i - 1] for i in history], "exclude_seen": False})
    assert r.status_code == 200, r.text
    _check(r.json(), _direct(recommender, tail, 10, False))


def test_health_and_metrics_after_bad_input(client):
    client.post("/recommend", content="{")
    health = client.get("/healthz")
    assert health.status_code == 200
    assert health.json()["num_items"] == NUM_ITEMS and health.json()["max_len"] == MAX_LEN
    text = client.get("/metrics").text
    assert 'recjpq_requests_total{endpoint="/recommend",status="400"}' in text
    assert 'recjpq_requests_total{endpoint="/recommend",status="200"}' in text
    assert 'recjpq_request_latency_seconds_bucket{endpoint="/recommend",le="+Inf"}' in text
    assert "# TYPE recjpq_batch_size histogram" in text and 'recjpq_batch_size_bucket{le="+Inf"}' in text
    assert client.get("/nowhere").status_code == 404


def _metric(text, name):
    return float(next(line.split()[-1] for line in text.splitlines() if line.startswith(name)))


def test_concurrent_clients_are_batched_and_correct(recommender):
    # a long wait window makes the gathering deterministic: all 12 requests are in flight together
    running = Running(create_app(recommender, max_batch=64, max_wait_ms=500))
    histories = _histories(3, 12)

    async def load():
        async with httpx.AsyncClient(base_url=running.url, timeout=30) as c:
            return await asyncio.gather(*[
                c.post("/recommend", json={"history": [RAW_IDS[i - 1] for i in h], "k": 3 + j % 5})
                for j, h in enumerate(histories)])

    try:
        responses = asyncio.run(load())
        for j, (r, h) in enumerate(zip(responses, histories)):
            assert r.status_code == 200, r.text
            _check(r.json(), _direct(recommender, h, 3 + j % 5, True))
        text = httpx.get(running.url + "/metrics").text
        batches = _metric(text, "recjpq_batch_size_count")
        assert batches < len(histories)  # some requests shared a forward
        assert _metric(text, "recjpq_batch_size_sum") == len(histories)
    finally:
        running.stop()


def test_graceful_shutdown_finishes_in_flight_requests(recommender):
    app = create_app(recommender, max_batch=64, max_wait_ms=1000)  # the request waits for batch-mates
    running = Running(app)
    result = {}

    def request():
        result["response"] = httpx.post(running.url + "/recommend", json={"history": ["1000"]}, timeout=30)

    client_thread = threading.Thread(target=request)
    client_thread.start()
    while app.state.batcher.pending == 0:  # in flight: queued in the batcher
        assert client_thread.is_alive()
        client_thread.join(0.005)
    running.stop()
    client_thread.join(30)
    assert result["response"].status_code == 200
    assert len(result["response"].json()["items"]) == 10
    with pytest.raises(httpx.ConnectError):
        httpx.get(running.url + "/healthz")


def test_batcher_drains_fails_cleanly_and_closes():
    calls = []

    def run_batch(queries):
        calls.append(list(queries))
        if "boom" in queries:
            raise RuntimeError("kernel failed")
        return [q * 2 for q in queries]

    async def scenario():
        batcher = MicroBatcher(run_batch, max_batch=3, max_wait_s=0.2)
        await batcher.start()
        jobs = [asyncio.ensure_future(batcher.submit(q)) for q in (["a"], ["b", "c"], ["d", "e", "f", "g"], ["h"])]
        done = await asyncio.gather(*jobs)
        failed = await asyncio.gather(batcher.submit(["boom"]), return_exceptions=True)
        after = await batcher.submit(["z"])  # the worker survived the failure
        await batcher.stop()
        with pytest.raises(BatcherClosed):
            await batcher.submit(["late"])
        return done, failed, after

    done, failed, after = asyncio.run(scenario())
    assert done == [["aa"], ["bb", "cc"], ["dd", "ee", "ff", "gg"], ["hh"]]
    assert isinstance(failed[0], RuntimeError) and after == ["zz"]
    # batches never exceed max_batch except for a single oversized request, which runs alone
    assert calls[:3] == [["a", "b", "c"], ["d", "e", "f", "g"], ["h"]]


def test_batcher_rejects_bad_settings():
    with pytest.raises(ValueError, match="max_batch"):
        MicroBatcher(list, max_batch=0)
    with pytest.raises(ValueError, match="max_wait_s"):
        MicroBatcher(list, max_wait_s=-1)


def test_cli_serve_subcommand(checkpoint):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "recjpq", "--threads", "1", "serve", str(checkpoint),
                             "--port", str(port), "--no-batching", "--log-level", "info"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env={**os.environ})
    try:
        url = f"http://127.0.0.1:{port}"
        while True:
            assert proc.poll() is None, proc.stdout.read().decode()
            try:
                health = httpx.get(url + "/healthz", timeout=5)
                break
            except httpx.TransportError:
                try:
                    proc.wait(0.1)
                except subprocess.TimeoutExpired:
                    pass
        assert health.json()["max_batch"] == 1
        r = httpx.post(url + "/recommend", json={"history": [1000, 1001], "k": 4})
        assert r.status_code == 200 and len(r.json()["items"]) == 4
    finally:
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(30)
    log = proc.stdout.read().decode()
    # uvicorn shuts down gracefully, then re-raises the signal so the exit status reports it
    assert "Application shutdown complete" in log and rc == -signal.SIGTERM, (rc, log)


def test_integers_beyond_the_parser_digit_limit_are_422(recommender):
    # CPython refuses to convert integers of more than 4,300 digits (a ValueError inside json.loads)
    bodies = ['{"history": [1000], "k": ' + "9" * 5000 + "}", '{"history": [' + "1" * 5000 + "]}",
              '{"history": [1000], "kk": -' + "1" * 4301 + "}"]
    running = Running(create_app(recommender, max_wait_ms=0))  # default body limit: 1 MiB
    try:
        for body in bodies:
            r = httpx.post(running.url + "/recommend", content=body)
            assert r.status_code == 422, r.text
            assert "integer of more than 4300 digits" in r.json()["detail"]
        metrics = httpx.get(running.url + "/metrics").text
    finally:
        running.stop()
    assert _status_count(metrics, "/recommend", 422) == len(bodies)


@pytest.mark.parametrize("length, status", [("9" * 5000, 413), ("\u00b2", 422)])
def test_odd_content_length_headers_are_4xx(recommender, length, status):
    # uvicorn refuses these headers itself; other ASGI servers may hand them to the app, so call it directly
    app = create_app(recommender)
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
             "path": "/recommend", "raw_path": b"/recommend", "query_string": b"", "root_path": "",
             "headers": [(b"content-length", length.encode("latin-1"))], "client": ("127.0.0.1", 1),
             "server": ("127.0.0.1", 80)}
    sent = []

    async def receive():
        return {"type": "http.request", "body": b"{}", "more_body": False}

    async def send(message):
        sent.append(message)

    asyncio.run(app(scope, receive, send))
    assert sent[0]["status"] == status, sent


class _FailingRecommender(Recommender):
    def recommend(self, queries):
        raise RuntimeError("the kernel fell over")


def _status_count(text, endpoint, status):
    name = f'recjpq_requests_total{{endpoint="{endpoint}",status="{status}"}}'
    return next((float(line.split()[-1]) for line in text.splitlines() if line.startswith(name)), 0.0)


def test_unexpected_errors_are_counted_500s_with_a_json_body(recommender):
    failing = _FailingRecommender(recommender.model, RAW_IDS, max_k=MAX_K)
    running = Running(create_app(failing, max_wait_ms=0))
    log = _capture_server_log()
    try:
        for _ in range(3):
            r = httpx.post(running.url + "/recommend", json={"history": ["1000"]}, timeout=30)
            assert r.status_code == 500
            assert r.json() == {"detail": "internal server error (RuntimeError); see the server log"}
        metrics = httpx.get(running.url + "/metrics").text
        assert _status_count(metrics, "/recommend", 500) == 3
        assert httpx.get(running.url + "/healthz").status_code == 200  # the server lives on
    finally:
        running.stop()
        logging.getLogger("uvicorn.error").removeHandler(log)
    text = log.stream.getvalue()
    assert text.count("RuntimeError: the kernel fell over") == 3 and "Traceback" not in text, text


def _capture_server_log():
    handler = logging.StreamHandler(io.StringIO())
    logging.getLogger("uvicorn.error").addHandler(handler)
    return handler


def test_clients_hanging_up_mid_body_are_counted_quietly(recommender):
    running = Running(create_app(recommender))
    log = _capture_server_log()
    port = int(running.url.rsplit(":", 1)[1])
    stalled = 50
    try:
        sockets = []
        for _ in range(stalled):  # each promises 1,000 bytes, sends 10, then hangs up
            s = socket.create_connection(("127.0.0.1", port), timeout=10)
            s.sendall(b"POST /recommend HTTP/1.1\r\nhost: x\r\ncontent-length: 1000\r\n\r\n{\"history\"")
            sockets.append(s)
        for s in sockets:
            s.close()
        deadline = time.monotonic() + 20
        while True:
            metrics = httpx.get(running.url + "/metrics").text
            if _status_count(metrics, "/recommend", 499) >= stalled or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        assert _status_count(metrics, "/recommend", 499) == stalled, metrics
        assert httpx.post(running.url + "/recommend", json={"history": ["1000"]}).status_code == 200
    finally:
        running.stop()
        logging.getLogger("uvicorn.error").removeHandler(log)
    text = log.stream.getvalue()
    assert "Exception in ASGI application" not in text and "ClientDisconnect" not in text, text


def test_non_finite_weights_are_refused_at_load(recommender, tmp_path):
    model = build_model("sasrec", NUM_ITEMS, codes=recommender.model.item_embedding.codes, dim=12,
                        item_embedding="recjpq", num_codes=8, num_layers=1, num_heads=1, dropout=0.0,
                        max_len=MAX_LEN)
    model.load_state_dict(recommender.model.state_dict())
    with torch.no_grad():
        model.encoder.norm.weight[3] = float("nan")
    with pytest.raises(ValueError, match=r"non-finite .*encoder\.norm\.weight"):
        Recommender(model, RAW_IDS)
    path = tmp_path / "nan.pt"
    save_checkpoint(path, model, {"item_ids": RAW_IDS})
    # `recjpq serve` exits at once with a message, never listening with a model that fails every request
    proc = subprocess.run([sys.executable, "-m", "recjpq", "--threads", "1", "serve", str(path), "--port", "0"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "non-finite" in proc.stderr and "encoder.norm.weight" in proc.stderr and "Traceback" not in proc.stderr
