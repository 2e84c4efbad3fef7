"""The `jax` judge backend: our Flax LM reads a rating distribution in one forward pass.

Per prompt: the rubric (rubric.py) becomes the single user message; the checkpoint tokenizer's
chat template renders it with the generation prompt (plus `answer_prefix`). A tokenizer without
a chat template gets the plain template `PLAIN_TEMPLATE` with its own special tokens. The
next-token distribution after that text gives `probs[r]`, the probability summed over every
vocabulary token that spells rating r (see `rating_token_table`).

Prompt text is data, never chat control: special-token strings inside it (e.g. "<|end|>") are
tokenized as plain text, so a prompt cannot close its turn and answer itself (`encode`).

Batches: prompts are left-padded to the smallest bucket length that fits (one compile per
bucket); `batch_size` is rows PER DEVICE, so a batch has `batch_size * batch_multiple(mesh)` rows
(padded with dummy rows) sharded over every mesh axis. Every device thus always computes the same
(batch_size, bucket) shape and the answers do not depend on the device count (in bfloat16 they
do depend on that shape: batch size and buckets are part of the cache key). Parameters are
FSDP-sharded by `llm_io.fsdp_spec`. A prompt longer than `max_length` tokens is cut (its text,
never the template) and flagged `truncated`.
"""
from __future__ import annotations

import os
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from flax import nnx

from fifa_jax.files import checkpoint_signature
from fifa_jax.scoring.rubric import RawJudgement, check_rubric, rating_of_token, render_rubric

PLAIN_TEMPLATE = "{content}\n\nRating:"
_SLOT = "@@FIFA_JAX_PROMPT_SLOT@@"   # stands for the prompt text while the template renders


def _writes_ten_as_one_token(tokenizer) -> bool:
    """Whether the tokenizer encodes "10" as one token. A vocabulary can hold "10" while the
    pre-tokenizer splits every digit (Qwen2's, kept from a cl100k-style vocabulary): the model
    then answers "1", "0", and P("1") would mix ratings 1 and 10."""
    ids = tokenizer("10", add_special_tokens=False)["input_ids"]
    spelled = [rating_of_token(t, 10) for t in tokenizer.convert_ids_to_tokens(ids)]
    return [r for r in spelled if r is not None] == [10]


def rating_token_table(tokenizer, vocab_size: int) -> dict[int, list[int]]:
    """rating (0..10) -> ids of the non-special tokens that spell it ("7", "▁7", "Ġ7").
    Rating 10 is left out when the tokenizer never produces a "10" token."""
    special = set(tokenizer.all_special_ids)
    table: dict[int, list[int]] = {}
    for token, idx in tokenizer.get_vocab().items():
        if idx in special or idx >= vocab_size:
            continue
        r = rating_of_token(token, 10)
        if r is not None:
            table.setdefault(r, []).append(int(idx))
    if 10 in table and not _writes_ten_as_one_token(tokenizer):
        del table[10]
    return {r: sorted(ids) for r, ids in sorted(table.items())}


def choose_max_rating(table: dict[int, list[int]], requested: int, where: str) -> int:
    """10 if "10" is one token, else 9 (requested > 0 forces it); every rating needs a token."""
    r_max = requested if requested > 0 else (10 if 10 in table else 9)
    missing = [r for r in range(r_max + 1) if r not in table]
    if missing:
        raise ValueError(f"{where}: tokenizer has no single token for ratings {missing}; "
                         f"set rating_max to at most {min(missing) - 1}")
    return r_max


def bucket_of(length: int, buckets: list[int]) -> int:
    for b in buckets:
        if length <= b:
            return b
    raise ValueError(f"length {length} exceeds the largest bucket {buckets[-1]}")


class JaxJudge:
    """Tokenizer, rating tokens and (lazily) the model of a local transformers checkpoint."""

    def __init__(self, cfg, mesh: jax.sharding.Mesh | None = None):
        from transformers import AutoTokenizer
        if not cfg.model_path or not os.path.isdir(cfg.model_path):
            raise FileNotFoundError(f"judge model_path {cfg.model_path!r} is not a folder "
                                    "(a transformers checkpoint: config.json, safetensors, "
                                    "tokenizer)")
        from fifa_jax.models.llm_config import load_lm_config
        check_rubric(cfg.rubric)
        self.cfg = cfg
        self.path = cfg.model_path
        self.lm_cfg = load_lm_config(self.path)
        self.tok = AutoTokenizer.from_pretrained(self.path)
        self.table = rating_token_table(self.tok, self.lm_cfg.vocab_size)
        self.max_rating = choose_max_rating(self.table, int(cfg.rating_max), self.path)
        self.has_template = bool(getattr(self.tok, "chat_template", None))
        self.model_id = cfg.model_id or os.path.abspath(self.path)
        self.buckets = sorted(int(b) for b in (cfg.buckets or ())) or [int(cfg.max_length)]
        if int(cfg.max_length) > self.buckets[-1]:
            raise ValueError(f"judge max_length {cfg.max_length} exceeds the largest bucket "
                             f"{self.buckets[-1]}")
        if int(cfg.batch_size) < 1:
            raise ValueError(f"judge batch_size must be >= 1 (prompts per device), "
                             f"got {cfg.batch_size}")
        self.mesh = mesh
        self._step = None
        self._parts = None
        # special tokens by id -> text (<unk> only counts where the text spells it)
        self._control = {int(i): t.content for i, t in self.tok.added_tokens_decoder.items()
                         if t.special}

    def settings(self) -> dict:
        """Everything that changes the raw answer (the cache key). In bfloat16 the padded
        length, the per-device batch and parameter sharding (FSDP) change the answer, so
        buckets, batch_size and the mesh's fsdp size count."""
        c = self.cfg
        return {"backend": "jax", "model_id": self.model_id, "rubric": c.rubric,
                "max_rating": self.max_rating, "answer_prefix": c.answer_prefix,
                "max_length": int(c.max_length), "dtype": c.dtype,
                "buckets": list(self.buckets), "batch_size": int(c.batch_size),
                "fsdp": int(dict(self.mesh.shape).get("fsdp", 1)) if self.mesh is not None else 1,
                "template": "chat" if self.has_template else PLAIN_TEMPLATE,
                "files": checkpoint_signature(self.path)}

    # -- prompts -> token ids -------------------------------------------------------------
    def _template_parts(self) -> list[str]:
        """The rendered chat prompt, split where the prompt text goes (rendered once)."""
        if self._parts is None:
            content = render_rubric(self.cfg.rubric, _SLOT, self.max_rating)
            if self.has_template:
                s = self.tok.apply_chat_template([{"role": "user", "content": content}],
                                                 tokenize=False, add_generation_prompt=True)
            else:
                s = PLAIN_TEMPLATE.format(content=content)
            parts = (s + self.cfg.answer_prefix).split(_SLOT)
            if len(parts) < 2:
                raise ValueError(f"judge chat template of {self.path} drops the user message")
            self._parts = parts
        return self._parts

    def _render(self, text: str) -> str:
        """The whole model input as text; the prompt text is inserted verbatim."""
        return text.join(self._template_parts())

    def _ids(self, texts: list[str]) -> list[list[int]]:
        """Token ids of `_render(text)` per text, special-token strings in the text as text."""
        parts = self._template_parts()
        strings = [t.join(parts) for t in texts]
        enc = self.tok(strings, add_special_tokens=not self.has_template,
                       return_offsets_mapping=True)
        out = []
        for t, s, ids, offs in zip(texts, strings, enc["input_ids"], enc["offset_mapping"]):
            spans, pos = [], 0
            for part in parts[:-1]:
                pos += len(part)
                spans.append((pos, pos + len(t)))
                pos += len(t)
            out.append(self._as_text(s, list(ids), [tuple(o) for o in offs], spans))
        return out

    def _as_text(self, s: str, ids: list[int], offs: list[tuple], spans: list[tuple]
                 ) -> list[int]:
        """`ids` of `s`, with every run of text that holds a special token parsed inside a
        prompt span re-tokenized with special-token strings split as plain text. The template's
        own special tokens (and those the tokenizer adds) stay; ordinary prompts keep `ids`."""
        def control(k):   # a special token matched in the text (not added by the tokenizer)
            a, b = offs[k]
            tid = ids[k]
            return (tid in self._control and b > a
                    and (tid != self.tok.unk_token_id or s[a:b] == self._control[tid]))
        inside = {k for k in range(len(ids)) if control(k)
                  and any(offs[k][0] < e and offs[k][1] > b0 for b0, e in spans)}
        if not inside:
            return ids
        anchor = [k not in inside and ids[k] in self._control
                  and (control(k) or offs[k][1] <= offs[k][0]) for k in range(len(ids))]
        out, i = [], 0
        while i < len(ids):
            if anchor[i]:
                out.append(ids[i])
                i += 1
                continue
            j = i
            while j < len(ids) and not anchor[j]:
                j += 1
            if inside.intersection(range(i, j)):
                a = offs[i - 1][1] if i > 0 else 0
                b = offs[j][0] if j < len(ids) and offs[j][1] > offs[j][0] else len(s)
                out += self.tok(s[a:b], add_special_tokens=False,
                                split_special_tokens=True)["input_ids"]
            else:
                out += ids[i:j]
            i = j
        return out

    def encode(self, texts: list[str]) -> tuple[list[list[int]], list[bool]]:
        """Token ids per prompt (<= max_length) and whether the prompt text was cut."""
        limit = int(self.cfg.max_length)
        ids = self._ids(texts)
        truncated = [False] * len(texts)
        overhead = len(self._ids([""])[0])
        for i, seq in enumerate(ids):
            if len(seq) <= limit:
                continue
            text_ids = self.tok(texts[i], add_special_tokens=False,
                                split_special_tokens=True)["input_ids"]
            keep = limit - overhead - 2
            for _ in range(32):
                if keep <= 0:
                    raise ValueError(f"judge max_length {limit} leaves no room for the prompt: "
                                     f"the rubric and template alone take {overhead} tokens")
                cut = self.tok.decode(text_ids[:keep], skip_special_tokens=True)
                seq = self._ids([cut])[0]
                if len(seq) <= limit:
                    break
                keep -= max(2, len(seq) - limit)
            else:
                raise ValueError(f"could not cut prompt {i} to {limit} tokens")
            ids[i], truncated[i] = seq, True
        return ids, truncated

    # -- the device step --------------------------------------------------------------------
    def _build(self):
        from fifa_jax.models.llm import next_token_logits
        from fifa_jax.models.llm_io import _default_mesh, load_llm
        dtype = jnp.dtype(self.cfg.dtype)
        self.mesh = self.mesh or _default_mesh()
        t0 = time.time()
        model = load_llm(self.path, dtype=dtype, mesh=self.mesh, attn_impl=self.cfg.attn_impl)
        logging.info("judge: loaded %s (%d params) in %.1fs", self.path,
                     self.lm_cfg.num_params, time.time() - t0)
        graphdef, state = nnx.split(model)
        token_ids = np.concatenate([self.table[r] for r in range(self.max_rating + 1)])
        rating = np.concatenate([[r] * len(self.table[r]) for r in range(self.max_rating + 1)])
        onehot = (rating[:, None] == np.arange(self.max_rating + 1)[None]).astype(np.float32)

        @jax.jit
        def step(state, ids, mask, token_ids, onehot):
            logits = next_token_logits(nnx.merge(graphdef, state), ids, mask)   # (B, V) f32
            p = jnp.exp(jax.nn.log_softmax(logits, axis=-1))[:, token_ids]       # (B, n_tok)
            return jnp.dot(p, onehot, precision=jax.lax.Precision.HIGHEST)     # (B, R + 1)

        self._state = state
        self._consts = (jnp.asarray(token_ids, jnp.int32), jnp.asarray(onehot))
        self._step = step

    def _run_batch(self, seqs: list[list[int]], length: int, rows: int) -> np.ndarray:
        pad = self.tok.pad_token_id if self.tok.pad_token_id is not None else 0
        ids = np.full((rows, length), pad, np.int32)
        mask = np.zeros((rows, length), np.int32)
        for i in range(rows):
            seq = seqs[i] if i < len(seqs) else seqs[0]        # dummy rows repeat row 0
            ids[i, length - len(seq):] = seq
            mask[i, length - len(seq):] = 1
        from fifa_jax.models.llm_io import put_global
        from fifa_jax.parallel import batch_sharding
        sharding = batch_sharding(self.mesh, 2)
        out = self._step(self._state, put_global(ids, sharding), put_global(mask, sharding),
                         *self._consts)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils
            out = multihost_utils.process_allgather(out, tiled=True)
        return np.asarray(jax.device_get(out))[:len(seqs)]

    def score(self, texts: list[str],
              on_batch: Callable[[dict[str, RawJudgement]], None] | None = None
              ) -> dict[str, RawJudgement]:
        """Raw judgements for `texts` (unique strings), one forward pass per batch."""
        if not texts:
            return {}
        ids, truncated = self.encode(texts)
        if self._step is None:
            self._build()
        from fifa_jax.parallel import batch_multiple
        rows = int(self.cfg.batch_size) * batch_multiple(self.mesh)   # batch_size per device
        order = sorted(range(len(texts)), key=lambda i: (bucket_of(len(ids[i]), self.buckets), i))
        batches = []
        for i in order:
            b = bucket_of(len(ids[i]), self.buckets)
            if batches and batches[-1][0] == b and len(batches[-1][1]) < rows:
                batches[-1][1].append(i)
            else:
                batches.append((b, [i]))
        out: dict[str, RawJudgement] = {}
        t0, last = time.time(), 0.0
        done = 0
        for bucket, idx in batches:
            probs = self._run_batch([ids[i] for i in idx], bucket, rows)
            got = {texts[i]: RawJudgement(max_rating=self.max_rating,
                                          probs=[float(x) for x in probs[j]],
                                          truncated=truncated[i])
                   for j, i in enumerate(idx)}
            out.update(got)
            if on_batch is not None:
                on_batch(got)
            done += len(idx)
            now = time.time()
            if now - last > 10 or done == len(texts):
                rate = done / max(now - t0, 1e-9)
                logging.info("judge: %d/%d prompts, %.1f/s, ETA %.0fs", done, len(texts), rate,
                             (len(texts) - done) / max(rate, 1e-9))
                last = now
        return out
