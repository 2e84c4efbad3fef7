"""A tiny random Llama judge in transformers layout, built offline (tests and the demo).

`build_tiny_judge_checkpoint(path, seed)` writes `config.json`, `model.safetensors` and a
word-level `PreTrainedTokenizerFast` (whitespace split, a small vocabulary with the digits and
"10", unknown words -> <unk>) with a chat template. transformers' `LlamaForCausalLM` and
`AutoTokenizer` load the folder. Its ratings are random but deterministic in `seed`.
"""
from __future__ import annotations

import os

import numpy as np

CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}")

SPECIAL = ["<pad>", "<unk>", "<s>", "</s>", "<|user|>", "<|assistant|>", "<|end|>",
           "<|system|>"]
WORDS = ("a an the of in on with and at by for to from is are photo painting drawing portrait "
         "cat dog bird horse car house city forest mountain river sea sky sun moon night day "
         "red blue green black white golden beautiful detailed realistic cinematic lighting "
         "style art digital oil 4k 8k hd prompt rate rating clear harmful safe image . , : ? ! "
         "- ' \"").split()


def build_tiny_judge_checkpoint(path: str, seed: int = 0, *, ten_token: bool = True,
                                hidden_size: int = 32, num_layers: int = 2) -> str:
    """Write the tiny judge into folder `path` and return it.

    ten_token=False leaves "10" out of the vocabulary (the judge then rates 0..9).
    """
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from fifa_jax.models.llm_config import from_hf_dict
    from fifa_jax.models.llm_io import random_torch_weights, save_checkpoint

    heads = max(4, hidden_size // 128)
    digits = [str(i) for i in range(10)] + (["10"] if ten_token else [])
    vocab = {tok: i for i, tok in enumerate(SPECIAL + digits + list(dict.fromkeys(WORDS)))}
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>", pad_token="<pad>",
                                   additional_special_tokens=SPECIAL[4:],
                                   chat_template=CHAT_TEMPLATE)
    os.makedirs(path, exist_ok=True)
    fast.save_pretrained(path)
    hf = {"architectures": ["LlamaForCausalLM"], "model_type": "llama",
          "vocab_size": len(vocab), "hidden_size": hidden_size,
          "intermediate_size": 2 * hidden_size, "num_hidden_layers": num_layers,
          "num_attention_heads": heads, "num_key_value_heads": heads // 2, "rms_norm_eps": 1e-5,
          "max_position_embeddings": 1024, "rope_theta": 10000.0,
          "tie_word_embeddings": False, "bos_token_id": vocab["<s>"],
          "eos_token_id": vocab["</s>"], "pad_token_id": vocab["<pad>"], "dtype": "float32"}
    weights = random_torch_weights(from_hf_dict(hf), seed=seed, std=0.3)
    # Large output rows for the rating tokens, small for the rest: most probability mass lands
    # on ratings (as with a real judge), and the rating still depends on the prompt.
    head = weights["lm_head.weight"]
    is_digit = np.zeros(len(vocab), bool)
    is_digit[[vocab[d] for d in digits]] = True
    head[~is_digit] *= 0.1
    head[is_digit] *= 2.0
    save_checkpoint(path, hf, weights)
    return path
