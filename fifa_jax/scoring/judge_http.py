"""The `http` judge backend: an OpenAI-compatible server (vLLM, TGI, ...), stdlib only.

`endpoint = "chat"`: POST {url}/v1/chat/completions with the rubric as the user message, the
server applying its own chat template; `endpoint = "completions"`: POST {url}/v1/completions
with `PLAIN_TEMPLATE`. Both ask for `max_tokens` tokens at temperature 0 with `top_logprobs`
alternatives; the first answer token's alternatives give the rating distribution (tokens that
spell a rating, probabilities summed). Without logprobs in the answer the first integer in the
text is the rating; a well-formed completion with neither is "unparsable" (cached: the model's
answer). An HTTP 200 whose body is not a completion (not JSON, or JSON without a choice, e.g.
`{"object": "error", "message": "server overloaded"}`) is a server failure, not an answer.

Transport: `concurrency` requests in flight, `timeout_s` each; HTTP 429/5xx, timeouts,
dropped connections and HTTP 200 bodies that are not a completion are retried `retries` times
with exponential back-off (`backoff_s * 2**attempt`). A prompt whose retries run out is
"failed"; if no connection can be made at all (connection refused, unknown host, no route)
`JudgeServerUnreachable` names the URL and stops the run (answers so far are in the cache, so
a rerun continues from there).
"""
from __future__ import annotations

import concurrent.futures as cf
import errno
import http.client
import json
import math
import os
import socket
import time
import urllib.error
import urllib.request
from typing import Callable

from absl import logging

from fifa_jax.errors import InputError
from fifa_jax.scoring.judge_jax import PLAIN_TEMPLATE
from fifa_jax.scoring.rubric import (RawJudgement, check_rubric, rating_from_text,
                                     rating_of_token, render_rubric)


class JudgeServerUnreachable(ConnectionError, InputError):
    """The judge server could not be reached at all."""


class NotACompletion(ValueError):
    """An HTTP 200 body that is not a completion: retried like a server error, never cached."""


_NO_CONNECTION = (errno.ECONNREFUSED, errno.EHOSTUNREACH, errno.ENETUNREACH, errno.EADDRNOTAVAIL)


def _never_connected(error) -> bool:
    """True for errors that mean no connection was made (refused, unknown host, no route);
    False for a connection that was made and then dropped or reset."""
    if isinstance(error, (ConnectionRefusedError, socket.gaierror)):
        return True
    return isinstance(error, OSError) and getattr(error, "errno", None) in _NO_CONNECTION


class HttpJudge:
    """Rates prompts through an OpenAI-compatible HTTP server."""

    def __init__(self, cfg):
        check_rubric(cfg.rubric)
        h = cfg.http
        if h.endpoint not in ("chat", "completions"):
            raise ValueError(f"judge http.endpoint must be 'chat' or 'completions', "
                             f"got {h.endpoint!r}")
        if not h.url:
            raise ValueError("judge backend 'http' needs http.url")
        self.cfg = cfg
        self.url = h.url.rstrip("/") + ("/v1/chat/completions" if h.endpoint == "chat"
                                        else "/v1/completions")
        self.max_rating = int(cfg.rating_max) if int(cfg.rating_max) > 0 else 10
        self.model_id = cfg.model_id or h.model or h.url

    def settings(self) -> dict:
        c, h = self.cfg, self.cfg.http
        return {"backend": "http", "model_id": self.model_id, "model": h.model,
                "endpoint": h.endpoint, "rubric": c.rubric, "max_rating": self.max_rating,
                "answer_prefix": c.answer_prefix, "top_logprobs": int(h.top_logprobs),
                "max_tokens": int(h.max_tokens)}

    # -- one request ----------------------------------------------------------------------
    def _body(self, text: str) -> dict:
        h = self.cfg.http
        content = render_rubric(self.cfg.rubric, text, self.max_rating)
        body = {"model": h.model, "max_tokens": int(h.max_tokens), "temperature": 0.0}
        if h.endpoint == "chat":
            msgs = [{"role": "user", "content": content}]
            if self.cfg.answer_prefix:
                msgs.append({"role": "assistant", "content": self.cfg.answer_prefix})
                # vLLM's extension: continue the assistant message instead of a new turn.
                body.update(continue_final_message=True, add_generation_prompt=False)
            body.update(messages=msgs, logprobs=True, top_logprobs=int(h.top_logprobs))
        else:
            body.update(prompt=PLAIN_TEMPLATE.format(content=content) + self.cfg.answer_prefix,
                        logprobs=int(h.top_logprobs))
        return body

    def _post(self, body: dict) -> dict:
        h = self.cfg.http
        headers = {"Content-Type": "application/json"}
        if h.api_key_env and os.environ.get(h.api_key_env):
            headers["Authorization"] = "Bearer " + os.environ[h.api_key_env]
        req = urllib.request.Request(self.url, data=json.dumps(body).encode("utf-8"),
                                     headers=headers, method="POST")
        with urllib.request.urlopen(req, timeout=float(h.timeout_s)) as resp:
            return json.loads(resp.read().decode("utf-8"))

    def parse(self, answer) -> RawJudgement:
        """A server answer -> raw judgement (probabilities, else a text rating).
        Raises NotACompletion for a body that is not a completion (the caller retries it)."""
        r_max = self.max_rating
        try:
            choice = answer["choices"][0]
            if not isinstance(choice, dict) or not ("message" in choice or "text" in choice):
                raise TypeError("the first choice has neither 'message' nor 'text'")
            if "message" in choice:
                text = choice["message"].get("content") or ""
                lp = choice.get("logprobs") or {}
                first = (lp.get("content") or [None])[0]
                tops = {t["token"]: t["logprob"] for t in (first or {}).get("top_logprobs") or []}
            else:
                text = choice.get("text") or ""
                lp = choice.get("logprobs") or {}
                tops = dict(((lp.get("top_logprobs") or [None])[0]) or {})
        except (KeyError, IndexError, TypeError, AttributeError) as e:
            raise NotACompletion(f"not a completion ({type(e).__name__}: {e}): "
                                 f"{json.dumps(answer)[:200]}") from None
        probs = [0.0] * (r_max + 1)
        found = False
        for token, logprob in tops.items():
            r = rating_of_token(str(token), r_max)
            if r is not None and isinstance(logprob, (int, float)) and math.isfinite(logprob):
                probs[r] += math.exp(logprob)
                found = True
        if found:
            return RawJudgement(max_rating=r_max, probs=probs)
        rating = rating_from_text(str(text), r_max)
        if rating is not None:
            return RawJudgement(max_rating=r_max, text_rating=rating)
        return RawJudgement(max_rating=r_max, error="unparsable",
                            detail=f"no rating in answer {str(text)[:80]!r}")

    def judge_one(self, text: str) -> RawJudgement:
        """Request with retries; raises JudgeServerUnreachable when nothing answers."""
        h = self.cfg.http
        body = self._body(text)
        last = ""
        unreachable = False
        for attempt in range(int(h.retries) + 1):
            if attempt:
                time.sleep(float(h.backoff_s) * 2 ** (attempt - 1))
            try:
                return self.parse(self._post(body))
            except urllib.error.HTTPError as e:
                last = f"HTTP {e.code}: {e.read()[:200]!r}"
                unreachable = False
                if e.code != 429 and e.code < 500:
                    # the server refuses this request (too long for its context, a policy, a
                    # bad model name): asking again gives the same answer, so it is cached
                    return RawJudgement(max_rating=self.max_rating, error="rejected",
                                        detail=last)
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                last, unreachable = f"HTTP 200 answer is not JSON ({e})", False
            except NotACompletion as e:
                last, unreachable = f"HTTP 200 answer is {e}", False
            except (socket.timeout, TimeoutError) as e:
                last, unreachable = f"timeout after {h.timeout_s}s ({e})", False
            except urllib.error.URLError as e:
                if isinstance(e.reason, (socket.timeout, TimeoutError)):
                    last, unreachable = f"timeout after {h.timeout_s}s", False
                else:
                    last, unreachable = f"{e.reason}", _never_connected(e.reason)
            except (http.client.HTTPException, OSError) as e:
                # a server that accepted the connection and then dropped it (or sent half an
                # answer) is up but failing this request: retried, then "failed", not fatal
                last, unreachable = f"{type(e).__name__}: {e}", _never_connected(e)
        if unreachable:
            raise JudgeServerUnreachable(
                f"judge server {self.url} unreachable after {int(h.retries) + 1} tries: {last}")
        return RawJudgement(max_rating=self.max_rating, error="failed", detail=last)

    def score(self, texts: list[str],
              on_batch: Callable[[dict[str, RawJudgement]], None] | None = None
              ) -> dict[str, RawJudgement]:
        """Raw judgements for `texts`, `batch_size` at a time, `concurrency` in flight."""
        out: dict[str, RawJudgement] = {}
        bs = max(1, int(self.cfg.batch_size))
        t0 = time.time()
        with cf.ThreadPoolExecutor(max_workers=max(1, int(self.cfg.http.concurrency))) as pool:
            for start in range(0, len(texts), bs):
                chunk = texts[start:start + bs]
                got = dict(zip(chunk, pool.map(self.judge_one, chunk)))
                out.update(got)
                if on_batch is not None:
                    on_batch(got)
                done = start + len(chunk)
                rate = done / max(time.time() - t0, 1e-9)
                logging.info("judge http: %d/%d prompts, %.1f/s, ETA %.0fs", done, len(texts),
                             rate, (len(texts) - done) / max(rate, 1e-9))
        return out
