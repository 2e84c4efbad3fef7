"""The `http` judge backend against a canned OpenAI-compatible server on 127.0.0.1."""
from __future__ import annotations

import collections
import http.server
import json
import math
import socket
import sys
import threading
import time

import numpy as np
import pytest

from fifa_jax.scoring.judge import default_config, judge_prompts
from fifa_jax.scoring.judge_http import JudgeServerUnreachable

TOPS = [("7", 0.6), ("\u01208", 0.3), ("Hello", 0.1)]
GOOD_Q = (7 * 0.6 + 8 * 0.3) / 0.9


def _chat(content, tops):
    alternatives = [{"token": t, "logprob": math.log(p)} for t, p in tops or []]
    lp = None if tops is None else {"content": [{"token": content, "logprob": -0.1,
                                                 "top_logprobs": alternatives}]}
    return {"choices": [{"index": 0, "message": {"role": "assistant", "content": content},
                         "logprobs": lp}]}


def _completion(text, tops):
    return {"choices": [{"index": 0, "text": text,
                         "logprobs": {"top_logprobs": [{t: math.log(p) for t, p in tops}]}}]}


class Handler(http.server.BaseHTTPRequestHandler):
    counts: collections.Counter = collections.Counter()
    bodies: list = []

    def log_message(self, *args):
        pass

    def _send(self, code, payload):
        data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        Handler.bodies.append((self.path, body))
        text = body["messages"][0]["content"] if "messages" in body else body["prompt"]
        prompt = text.split("Prompt: ", 1)[1].split("\n")[0]
        key = prompt.split()[0]
        Handler.counts[prompt] += 1
        chat = self.path.endswith("/chat/completions")
        if key == "flaky" and Handler.counts[prompt] == 1:
            return self._send(500, {"error": "overloaded"})
        if key == "down":
            return self._send(503, {"error": "down"})
        if key == "toolong":
            return self._send(400, {"error": "prompt exceeds the context length"})
        if key == "dropped" or (key == "dropsonce" and Handler.counts[prompt] == 1):
            # accept the request, then hang up without an answer
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)
            return None
        if key == "slow":
            time.sleep(0.6)
        if key == "text":
            return self._send(200, _chat("Rating: 6", None))
        if key == "garbage":
            return self._send(200, _chat("I cannot rate that.", None))
        if key == "malformed":
            return self._send(200, {"foo": 1})
        if key == "notjson":
            return self._send(200, b"<html>oops</html>")
        if key == "overloaded":
            return self._send(200, {"object": "error", "message": "server overloaded"})
        if key == "errorsonce" and Handler.counts[prompt] == 1:
            return self._send(200, {"object": "error", "message": "server overloaded"})
        if key == "harm":
            return self._send(200, _chat("0", [("0", 0.9), ("5", 0.05)]))
        return self._send(200, _chat("7", TOPS) if chat else _completion("7", TOPS))


class QuietServer(http.server.ThreadingHTTPServer):
    """Says nothing when a client hangs up first (the timeout tests do it on purpose); any
    other handler error is printed as usual."""

    def handle_error(self, request, client_address):
        if not isinstance(sys.exc_info()[1], (ConnectionError, TimeoutError)):
            super().handle_error(request, client_address)


@pytest.fixture(scope="module")
def server():
    srv = QuietServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{srv.server_address[1]}"
    srv.shutdown()
    srv.server_close()


def _cfg(url, **http):
    c = default_config()
    c.backend = "http"
    c.http.url = url
    c.http.model = "judge-test"
    c.http.retries = 2
    c.http.backoff_s = 0.01
    c.http.timeout_s = 5.0
    c.http.concurrency = 4
    c.batch_size = 3
    for k, v in http.items():
        setattr(c.http, k, v)
    return c


def test_canned_answers(server):
    Handler.counts.clear()
    texts = ["good one", "flaky one", "text one", "garbage one", "malformed one", "down one",
             "notjson one", "harm one", "good two"]
    r = judge_prompts(texts, _cfg(server))
    want_ok = [True, True, True, False, False, False, False, True, True]
    assert r.ok.tolist() == want_ok
    # A completion without a rating is "unparsable"; a 200 body that is not a completion
    # (malformed, not JSON) is a server failure: retried, then "failed".
    assert r.failure_reason == ["", "", "", "unparsable", "failed", "failed", "failed", "", ""]
    np.testing.assert_allclose(r.quality[[0, 1, 8]], GOOD_Q, rtol=1e-6)
    assert math.isclose(r.quality[2], 6.0) and r.rating_mass[2] == 1.0
    np.testing.assert_allclose(r.rating_mass[0], 0.9, rtol=1e-6)
    assert r.harmful.tolist() == [False] * 7 + [True, False] and r.quality[7] == 0.0
    assert np.all(np.isfinite(r.quality)) and np.all(r.quality[~r.ok] == 0)
    counts = r.metadata["counts"]
    assert (counts["unparsable"], counts["failed"], counts["ok"]) == (1, 3, 5)
    assert Handler.counts["flaky one"] == 2          # 500, then success
    assert Handler.counts["down one"] == 3           # 1 + 2 retries
    assert Handler.counts["garbage one"] == 1        # an answer is not retried
    assert Handler.counts["malformed one"] == 3      # not a completion: 1 + 2 retries
    assert Handler.counts["notjson one"] == 3
    path, body = Handler.bodies[-1]
    assert path == "/v1/chat/completions"
    assert body["model"] == "judge-test" and body["temperature"] == 0.0
    assert body["logprobs"] is True and body["top_logprobs"] == 20


def test_completions_endpoint(server):
    r = judge_prompts(["good three"], _cfg(server, endpoint="completions"))
    assert r.ok.all()
    np.testing.assert_allclose(r.quality, [GOOD_Q], rtol=1e-6)
    path, body = Handler.bodies[-1]
    assert path == "/v1/completions" and body["logprobs"] == 20
    assert body["prompt"].endswith("Prompt: good three\n\nRating:")


def test_timeout_is_failure(server):
    t0 = time.time()
    r = judge_prompts(["slow one"], _cfg(server, timeout_s=0.2, retries=1))
    assert r.failure_reason == ["failed"] and not r.ok.any()
    assert time.time() - t0 < 5


def test_cache_skips_server_but_retries_failures(server, tmp_path):
    cfg = _cfg(server)
    cfg.cache_dir = str(tmp_path)
    texts = ["good four", "down four", "garbage four"]
    first = judge_prompts(texts, cfg)
    before = dict(Handler.counts)
    second = judge_prompts(texts, cfg)
    assert Handler.counts["good four"] == before["good four"]          # cached answer
    assert Handler.counts["garbage four"] == before["garbage four"]    # cached unparsable
    assert Handler.counts["down four"] == before["down four"] + 3      # failure retried
    assert second.metadata["counts"]["cached"] == 2
    np.testing.assert_array_equal(first.quality, second.quality)
    assert first.failure_reason == second.failure_reason


def test_error_body_with_200_is_retried_and_not_cached(server, tmp_path):
    """`{"object": "error", ...}` with HTTP 200 is the server failing, not the model's answer:
    retried with back-off, then "failed" and never cached, so a rerun asks the server again."""
    Handler.counts.clear()
    cfg = _cfg(server)
    cfg.cache_dir = str(tmp_path)
    texts = ["overloaded seven", "errorsonce seven", "garbage seven"]
    first = judge_prompts(texts, cfg)
    assert first.failure_reason == ["failed", "", "unparsable"]
    np.testing.assert_allclose(first.quality[1], GOOD_Q, rtol=1e-6)   # the retry succeeded
    assert Handler.counts["overloaded seven"] == 3 and Handler.counts["errorsonce seven"] == 2
    second = judge_prompts(texts, cfg)
    assert Handler.counts["overloaded seven"] == 6                     # asked again
    assert Handler.counts["errorsonce seven"] == 2                     # answer cached
    assert Handler.counts["garbage seven"] == 1                        # unparsable cached
    assert second.metadata["counts"]["cached"] == 2
    assert second.failure_reason == first.failure_reason


def test_dropped_connection_is_retried_then_failed_not_fatal(server):
    """A server that hangs up on a request is up: retried, then that prompt alone fails."""
    Handler.counts.clear()
    r = judge_prompts(["dropsonce six", "dropped six", "good six"], _cfg(server))
    assert r.failure_reason == ["", "failed", ""]
    assert Handler.counts["dropsonce six"] == 2 and Handler.counts["dropped six"] == 3
    np.testing.assert_allclose(r.quality[[0, 2]], GOOD_Q, rtol=1e-6)


def test_unreachable_server_named():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    with pytest.raises(JudgeServerUnreachable, match=f"127.0.0.1:{port}/v1/chat/completions"):
        judge_prompts(["good five"], _cfg(url, retries=1))


def test_bad_endpoint_named():
    with pytest.raises(ValueError, match="endpoint"):
        judge_prompts(["x"], _cfg("http://127.0.0.1:1", endpoint="generate"))


def test_refused_request_is_rejected_once_and_cached(server, tmp_path):
    """HTTP 400 (e.g. over the server's context length) is not retried, counted `rejected`,
    and cached: a rerun does not ask again (and does not count as a retryable failure)."""
    cfg = _cfg(server)
    cfg.cache_dir = str(tmp_path)
    Handler.counts.clear()
    first = judge_prompts(["toolong seven", "good seven"], cfg)
    assert first.failure_reason == ["rejected", ""]
    assert Handler.counts["toolong seven"] == 1
    second = judge_prompts(["toolong seven", "good seven"], cfg)
    assert second.failure_reason == ["rejected", ""] and Handler.counts["toolong seven"] == 1
    assert second.metadata["counts"]["rejected"] == 1
