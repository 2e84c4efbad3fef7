"""The demo world's pretrained CLIP-layout proxy reward, shipped in the package.

`build_demo_reward(folder)` installs the files of `fifa_jax/demo/models/reward/` (trained
PickScore-style on the demo world by `python -m fifa_jax.demo.build_models`, see
`demo/train_clip.py`; imperfect on purpose), a transformers-layout CLIPModel folder:
  config.json + model.safetensors    (`model_config`: 32-wide towers, 2 layers each, ViT
                                      patch 4 on 32 x 32 inputs, projection 16)
  vocab.json + merges.txt + tokenizer_config.json + special_tokens_map.json
                                     (`tokenizer_files`: a CLIP byte-level BPE tokenizer: the
                                      256 byte symbols, their end-of-word forms, and merges
                                      learnt by plain BPE from a fixed word list)
  preprocessor_config.json           (`preprocessor_config`: CLIP processor, shortest edge and
                                      crop = IMAGE_SIZE, bicubic, OpenAI mean/std)
Installed by `demo/shipped.py` (unchanged files are not rewritten, so their mtimes, which key
the margin chunks' fingerprint, stay put).
"""
from __future__ import annotations

import collections
import json
import math
import os

from fifa_jax.demo import shipped
from fifa_jax.scoring.preprocess import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

IMAGE_SIZE = 32
BOS, EOS = "<|startoftext|>", "<|endoftext|>"
_CORPUS = """a photo of the cat dog on in with and red blue green yellow black white small large
portrait painting landscape city street night sunset beach forest mountain river lake sky
cloud tree flower house car train boat bird horse woman man girl boy child old young
beautiful detailed digital art oil watercolor sketch style highly realistic fantasy castle
dragon robot space planet star moon light dark golden hour cinematic lighting 4k 8k trending
artstation concept by an at from under over standing sitting walking running playing wearing
hat dress shirt glasses smiling happy sad cute funny scary magic ancient modern futuristic
cyberpunk steampunk anime cartoon illustration render unreal engine octane sharp focus
wide angle close up view background colorful vibrant pastel neon glowing reflection water
snow rain fog fire smoke stone wood glass metal gold silver cafe kitchen room window door
table chair book cup coffee tea food cake pizza fruit apple banana garden park bridge tower"""


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP byte -> printable unicode symbol table (printable bytes map to themselves)."""
    keep = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("\u00a1"), ord("\u00ac") + 1))
            + list(range(ord("\u00ae"), ord("\u00ff") + 1)))
    out, extra = {}, 0
    for b in range(256):
        if b in keep:
            out[b] = chr(b)
        else:
            out[b] = chr(256 + extra)
            extra += 1
    return out


def learn_merges(words: list[str], n_merges: int) -> list[tuple[str, str]]:
    """Plain BPE on `words` (CLIP style: last symbol carries '</w>'); ties -> smallest pair."""
    b2u = bytes_to_unicode()
    seqs = collections.Counter()
    for w in words:
        syms = [b2u[b] for b in w.encode("utf-8")]
        syms[-1] += "</w>"
        seqs[tuple(syms)] += 1
    merges = []
    for _ in range(n_merges):
        counts = collections.Counter()
        for seq, c in seqs.items():
            for a, b in zip(seq, seq[1:]):
                counts[(a, b)] += c
        if not counts:
            break
        best_n = max(counts.values())
        if best_n < 2:
            break
        pair = min(p for p, c in counts.items() if c == best_n)
        merges.append(pair)
        new = collections.Counter()
        for seq, c in seqs.items():
            out, i = [], 0
            while i < len(seq):
                if i + 1 < len(seq) and (seq[i], seq[i + 1]) == pair:
                    out.append(seq[i] + seq[i + 1])
                    i += 2
                else:
                    out.append(seq[i])
                    i += 1
            new[tuple(out)] += c
        seqs = new
    return merges


def tokenizer_files(n_merges: int = 200) -> dict[str, bytes]:
    """File name -> content of the tiny CLIP tokenizer."""
    b2u = bytes_to_unicode()
    symbols = [b2u[b] for b in range(256)]
    vocab_list = symbols + [s + "</w>" for s in symbols]
    merges = learn_merges(_CORPUS.split(), n_merges)
    vocab_list += ["".join(m) for m in merges]
    vocab_list += [BOS, EOS]
    vocab = {tok: i for i, tok in enumerate(dict.fromkeys(vocab_list))}
    merges_txt = "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges)
    tok_cfg = {"tokenizer_class": "CLIPTokenizer", "model_max_length": 77,
               "bos_token": BOS, "eos_token": EOS, "unk_token": EOS, "pad_token": EOS,
               "do_lower_case": True, "errors": "replace"}
    special = {"bos_token": BOS, "eos_token": EOS, "unk_token": EOS, "pad_token": EOS}
    dump = lambda d: (json.dumps(d, ensure_ascii=False, indent=1, sort_keys=True)  # noqa: E731
                      + "\n").encode("utf-8")
    return {"vocab.json": dump(vocab), "merges.txt": merges_txt.encode("utf-8"),
            "tokenizer_config.json": dump(tok_cfg), "special_tokens_map.json": dump(special)}


def model_config(vocab_size: int, bos_id: int, eos_id: int) -> dict:
    """transformers CLIPConfig dict of the tiny reward."""
    text = {"vocab_size": vocab_size, "hidden_size": 32, "intermediate_size": 64,
            "num_hidden_layers": 2, "num_attention_heads": 4, "max_position_embeddings": 77,
            "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5, "projection_dim": 16,
            "bos_token_id": bos_id, "eos_token_id": eos_id, "pad_token_id": eos_id,
            "model_type": "clip_text_model"}
    vision = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
              "num_attention_heads": 4, "num_channels": 3, "image_size": IMAGE_SIZE,
              "patch_size": 4, "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5,
              "projection_dim": 16, "model_type": "clip_vision_model"}
    return {"architectures": ["CLIPModel"], "model_type": "clip", "projection_dim": 16,
            "logit_scale_init_value": math.log(100.0), "text_config": text,
            "vision_config": vision}


def preprocessor_config(image_size: int) -> bytes:
    """The CLIP processor config: shortest edge and crop = image_size, bicubic, OpenAI
    mean / std."""
    return (json.dumps({
        "crop_size": {"height": image_size, "width": image_size}, "do_center_crop": True,
        "do_convert_rgb": True, "do_normalize": True, "do_rescale": True, "do_resize": True,
        "image_mean": list(OPENAI_CLIP_MEAN), "image_std": list(OPENAI_CLIP_STD),
        "image_processor_type": "CLIPImageProcessor", "resample": 3,
        "rescale_factor": 1 / 255, "size": {"shortest_edge": image_size}},
        indent=1, sort_keys=True) + "\n").encode()


SHIPPED = os.path.join(shipped.ROOT, "reward")


def build_demo_reward(folder) -> str:
    """Install the shipped pretrained demo reward (checkpoint, tokenizer, processor config)
    into `folder` (created if absent); returns it."""
    return shipped.install("reward", "model.safetensors", folder)
