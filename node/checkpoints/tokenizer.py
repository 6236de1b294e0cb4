"""A tiny Qwen-style byte-level BPE tokenizer, built offline and deterministically.

The vocabulary is the 256 byte-level symbols plus BPE merges learned from a small built-in
corpus, followed by Qwen's special tokens at the END of the vocabulary (as in Qwen's own
tokenizer): ``<|endoftext|>``, ``<|im_start|>``, ``<|im_end|>`` (special) and ``<think>``,
``</think>`` (added, not special). ``<|im_end|>`` is the end-of-sequence token.

The files written (``tokenizer.json`` + ``tokenizer_config.json`` with a Qwen-style
``chat_template``) load through ``transformers.AutoTokenizer`` and therefore ``mlx_lm.load``;
the ByteLevel decoder makes mlx-lm pick its BPE streaming detokenizer.
"""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

VOCAB_SIZE = 512
EOS_TOKEN = "<|im_end|>"
PAD_TOKEN = "<|endoftext|>"
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
ADDED_TOKENS = ("<think>", "</think>")

CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

# Training text for the merges: plain prose, a little code and numbers, so common English
# fragments become single tokens. Changing it changes every tokenizer (bump BUILDER_VERSION).
_CORPUS = """
The cluster is a handful of machines on one desk. Each node runs a small daemon that finds
its peers, reports how much memory it has, and loads the part of the model it was given.
When a request arrives, the first node turns the prompt into tokens, runs the embedding and
its own layers, and streams the hidden states to the next node. The last node applies the
final norm and the language model head, samples the next token, and sends it back.
Speculative decoding lets a small head guess several tokens ahead; the target model then
checks all of them in one pass and keeps the longest prefix it agrees with. When the guess
is wrong the caches must roll back exactly, otherwise the output would drift.
Hello, world! How are you today? I am fine, thank you. What time is it in the morning?
Once upon a time there was a little robot who wanted to learn how to write poems about the
sea, the mountains and the quiet evening light over the city.
def add(a, b):
    return a + b

for i in range(10):
    print(i, i * i)

The numbers 0 1 2 3 4 5 6 7 8 9 10 42 100 2024 3.14 are here, and so are the words
model, token, layer, memory, network, attention, expert, weight, cache, stream, answer.
"""


@cache
def _trained_tokenizer_json() -> str:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    n_extra = len(SPECIAL_TOKENS) + len(ADDED_TOKENS)
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE - n_extra,
        min_frequency=2,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    # Repeat the corpus so every merge has a stable, unambiguous count.
    tokenizer.train_from_iterator([_CORPUS] * 4, trainer=trainer)
    tokenizer.add_special_tokens(
        [AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS]
    )
    tokenizer.add_tokens([AddedToken(t, special=False, normalized=False) for t in ADDED_TOKENS])
    return tokenizer.to_str()


def build_tokenizer() -> Tokenizer:
    """The tokenizer as a ``tokenizers.Tokenizer`` (same vocabulary every call)."""
    return Tokenizer.from_str(_trained_tokenizer_json())


def vocab_size() -> int:
    return build_tokenizer().get_vocab_size(with_added_tokens=True)


def token_id(token: str) -> int:
    tid = build_tokenizer().token_to_id(token)
    if tid is None:
        raise ValueError(f"token {token!r} is not in the tiny tokenizer")
    return tid


def special_token_ids() -> list[int]:
    """Ids of every special and added token (never produced greedily by constructed models)."""
    return [token_id(t) for t in (*SPECIAL_TOKENS, *ADDED_TOKENS)]


def tokenizer_config(tok: Tokenizer | None = None) -> dict:
    """tokenizer_config.json for ``tok`` (the builders' tokenizer by default): Qwen-style
    specials, eos ``<|im_end|>`` and the chat template. The demo-model trainer uses it too."""
    tok = tok or build_tokenizer()
    added = {
        str(tok.token_to_id(t)): {
            "content": t,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": t in SPECIAL_TOKENS,
        }
        for t in (*SPECIAL_TOKENS, *ADDED_TOKENS)
    }
    return {
        "add_bos_token": False,
        "add_prefix_space": False,
        "added_tokens_decoder": added,
        "additional_special_tokens": ["<|im_start|>", "<|im_end|>"],
        "bos_token": None,
        "chat_template": CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "eos_token": EOS_TOKEN,
        "errors": "replace",
        "model_max_length": 4096,
        "pad_token": PAD_TOKEN,
        "split_special_tokens": False,
        "tokenizer_class": "PreTrainedTokenizerFast",
        "unk_token": None,
    }


def write_tokenizer(out_dir: Path) -> None:
    """Write tokenizer.json and tokenizer_config.json into ``out_dir``."""
    (out_dir / "tokenizer.json").write_text(_trained_tokenizer_json(), encoding="utf-8")
    (out_dir / "tokenizer_config.json").write_text(
        json.dumps(tokenizer_config(), indent=2, sort_keys=True), encoding="utf-8"
    )
