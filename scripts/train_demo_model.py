#!/usr/bin/env python3
"""Train macmesh's bundled demo model: a tiny Qwen3.5 (qwen3_5) with a jointly trained MTP head.

The text is CPython's documentation as it ships offline (Debian ``python3-doc``: the reST
sources under ``/usr/share/doc/python3.11/html/_sources``), lightly cleaned of reST markup.
A byte-level BPE tokenizer with Qwen's special tokens is trained on the same text. A quarter
of the documentation sections are wrapped in Qwen's chat format (section title as the user
turn, the section as the assistant turn) so the chat template the CLI applies leads somewhere.

The model is mlx-lm's own ``qwen3_5`` (hybrid GatedDeltaNet + full attention) plus an MTP head
with the Qwen3.5 semantics: for target position t with post-final-norm hidden ``h_t`` and the
next token ``x_{t+1}``::

    e = pre_fc_norm_embedding(embed(x_{t+1}))      h = pre_fc_norm_hidden(h_t)
    x = fc(concat([e, h], -1))                      # Linear 2D -> D, embedding half first
    x = layers[0](x)                                # full-attention decoder layer, causal,
                                                    # RoPE position t (the position of h_t)
    logits_{t+2} = lm_head(norm(x))                 # the shared (here tied) LM head

Loss = CE(next token) + ``mtp_weight`` * CE(token after next). The MTP input hidden is NOT
detached: the MTP loss also trains the trunk (as in DeepSeek-V3's MTP training). The head is
``node.checkpoints.reference_mtp.ReferenceMTP``, the same semantics the inference engine uses.

The result is written in the original Hugging Face layout (``model.language_model.*``,
top-level ``mtp.*`` in the last shard, conv1d as (C, 1, K), RMSNorm weights as offsets; the
conversion is ``node.checkpoints.layouts``) to ``node/models/macmesh-tiny`` by default, loads
with ``mlx_lm.load``, and gets a ``training_summary.json`` (losses, acceptance, samples).

Training is deterministic for a seed (batches are drawn from an RNG keyed by (seed, step)) and
resumable: state is saved to ``--work-dir`` every ``--save-every`` steps. ``--max-minutes`` is
a budget over all resumed runs together; a rerun with the same arguments continues where the
last one stopped, and a rerun of a finished (or out-of-budget) run only re-exports. The
bundled model is the defaults (400 steps of 16 x 128 tokens, ~29 min on 2 busy cores):

    nice -n 10 env OPENBLAS_NUM_THREADS=1 \\
        LD_PRELOAD=/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3 \\
        python scripts/train_demo_model.py
"""

from __future__ import annotations

import argparse
import copy
import json
import re
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten, tree_unflatten
from mlx_lm.models import qwen3_5
from tokenizers import (
    AddedToken,
    Tokenizer,
    decoders,
    models,
    normalizers,
    pre_tokenizers,
    trainers,
)

from node.checkpoints.layouts import hf_main_weights, hf_mtp_weights, hf_sort_key
from node.checkpoints.reference_mtp import ReferenceMTP, load_reference_mtp, measure_agreement
from node.checkpoints.tokenizer import (
    ADDED_TOKENS,
    EOS_TOKEN,
    PAD_TOKEN,
    SPECIAL_TOKENS,
    tokenizer_config,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO_ROOT / "node" / "models" / "macmesh-tiny"
DEFAULT_WORK = Path("/tmp/macmesh-train-demo")
DEFAULT_DOCS = Path("/usr/share/doc/python3.11/html/_sources")

# Parts of the documentation left out: C-level API reference and the retired distutils.
SKIPPED_DOC_DIRS = ("c-api", "distutils")

CHAT_PROMPTS = ("{title}", "Tell me about {title}.", "Explain {title}.", "Write about {title}.")


@dataclass(frozen=True)
class ModelShape:
    """The architecture knobs (names follow the HF text_config keys)."""

    vocab_size: int = 3072
    hidden_size: int = 192
    intermediate_size: int = 512
    num_hidden_layers: int = 4
    full_attention_interval: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    head_dim: int = 48
    linear_num_key_heads: int = 2
    linear_key_head_dim: int = 32
    linear_num_value_heads: int = 4
    linear_value_head_dim: int = 48
    linear_conv_kernel_dim: int = 4
    rope_theta: float = 10_000.0
    partial_rotary_factor: float = 0.25
    max_position_embeddings: int = 4096
    rms_norm_eps: float = 1e-6


@dataclass(frozen=True)
class TrainConfig:
    seed: int = 0
    steps: int = 400
    batch_size: int = 16
    seq_len: int = 128
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 30
    mtp_weight: float = 0.5
    grad_clip: float = 1.0
    chat_fraction: float = 0.25
    val_every_nth_file: int = 40


# --------------------------------------------------------------------------------------------
# Corpus: CPython's reST documentation, cleaned to plain text.
# --------------------------------------------------------------------------------------------


# Directives whose content is metadata or markup, dropped with their bodies.
def _words(text: str) -> frozenset[str]:
    return frozenset(text.split())


_DROP_DIRECTIVES = _words(
    """index toctree only sectionauthor moduleauthor highlight highlightlang testsetup testcleanup
    tabularcolumns raw image figure literalinclude include audit-event audit-event-table csv-table
    list-table productionlist grammar-snippet program option envvar cmdoption availability
    c:function c:macro c:type c:member c:var c:struct opcode pdbcommand 2to3fixer limited-api-list
    miscnews rubric currentmodule default-role contents"""
)
_TITLED_DIRECTIVES = {
    "note": "Note:",
    "warning": "Warning:",
    "seealso": "See also:",
    "tip": "Tip:",
    "important": "Important:",
    "caution": "Caution:",
    "impl-detail": "CPython detail:",
    "versionadded": "New in version",
    "versionchanged": "Changed in version",
    "deprecated": "Deprecated since version",
    "deprecated-removed": "Deprecated since version",
}
# Object descriptions: the signature becomes a plain line above its description.
_SIGNATURE_DIRECTIVES = _words(
    """function method class attribute data exception decorator classmethod staticmethod module
    describe abstractmethod coroutinefunction coroutinemethod decoratormethod property
    awaitablefunction awaitablemethod"""
)
_DIRECTIVE = re.compile(r"^(\s*)\.\.\s+([\w:-]+)::\s*(.*)$")
_COMMENT_OR_LABEL = re.compile(r"^(\s*)\.\.(\s|$)")
_ROLE = re.compile(r":[\w:+.-]+:`([^`]*)`")
_LINK = re.compile(r"`([^`<]*?)\s*<[^`>]*>`_{1,2}")
_SIMPLE_LINK = re.compile(r"`([^`]+)`_{1,2}")
_LITERAL = re.compile(r"``([^`]+)``")
_EMPHASIS = re.compile(r"(?<![\w*])\*\*?([^*\s][^*]*?)\*\*?(?![\w*])")
_ADORNMENT = re.compile(r"^\s*([=\-~^\"'*#+`])\1{2,}\s*$")
_GRID = re.compile(r"^\s*[+|][-=+|: ]*$")
_TABLE_ROW = re.compile(r"^\s*\|.*\|\s*$")
_FOOTNOTE_REF = re.compile(r"\s*\[(#\w*|\d+|\*)\]_")


def _role_text(match: re.Match[str]) -> str:
    text = match.group(1)
    if "<" in text and text.endswith(">"):  # :ref:`title <label>`
        text = text[: text.rindex("<")].strip() or text
    text = text.lstrip("!")
    if text.startswith("~"):  # :func:`~os.path.join` renders as join()
        text = text[1:].rsplit(".", 1)[-1]
    return text


def clean_inline(text: str) -> str:
    """Inline markup to its text; works on whole paragraphs (roles may span lines)."""
    text = _ROLE.sub(_role_text, text)
    text = _LINK.sub(r"\1", text)
    text = _SIMPLE_LINK.sub(r"\1", text)
    text = _LITERAL.sub(r"\1", text)
    text = _EMPHASIS.sub(r"\1", text)
    text = _FOOTNOTE_REF.sub("", text)
    return re.sub(r"\|(\w[\w-]*)\|", r"\1", text)


def _literal_marker(line: str) -> str:
    """``For example::`` introduces a code block; in plain text it reads ``For example:``."""
    if line.rstrip().endswith("::"):
        stripped = line.rstrip()[:-2].rstrip()
        return stripped + ":" if stripped else ""
    return line.rstrip()


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip(" "))


def _block_end(lines: list[str], start: int, base: int) -> int:
    """End of the block indented deeper than ``base`` that starts at ``start`` (blanks included)."""
    j = start
    while j < len(lines) and (not lines[j].strip() or _indent(lines[j]) > base):
        j += 1
    return j


def _dedent_to(block: list[str], base: int) -> list[str]:
    indents = [_indent(b) for b in block if b.strip()]
    shift = max(0, min(indents, default=base) - base)
    return [b[shift:] if b.strip() else "" for b in block]


def clean_rst(text: str) -> str:
    """reST source to readable plain text: prose and code kept, markup and metadata dropped."""
    lines = text.expandtabs(4).splitlines()
    out: list[str] = []
    i = 0
    while i < len(lines):
        line = lines[i]
        directive = _DIRECTIVE.match(line)
        if directive or _COMMENT_OR_LABEL.match(line):
            base = _indent(line)
            end = _block_end(lines, i + 1, base)
            name = directive.group(2) if directive else ""
            if not directive or name in _DROP_DIRECTIVES:
                out.append("")
                i = end
                continue
            arg = directive.group(3).strip()
            body = [b for b in lines[i + 1 : end] if not re.match(r"^\s*:[\w-]+:( |$)", b)]
            header: list[str] = []
            if name in _TITLED_DIRECTIVES:
                header = [" " * base + f"{_TITLED_DIRECTIVES[name]} {arg}".rstrip()]
            elif name in _SIGNATURE_DIRECTIVES and arg:
                header = [" " * base + arg]
                # Further signatures continue the directive line, before the first blank line.
                while body and body[0].strip():
                    header.append(" " * base + body.pop(0).strip())
            # Splice the dedented body back so nested directives are cleaned by this same loop.
            lines[i:end] = [*header, *_dedent_to(body, base)]
            out.extend(header)
            i += len(header)
            continue
        if not (_ADORNMENT.match(line) or _GRID.match(line) or _TABLE_ROW.match(line)):
            out.append(_literal_marker(line))
        i += 1
    text = clean_inline("\n".join(out))
    text = re.sub(r"\n{3,}", "\n\n", text)
    return text.strip() + "\n"


_TITLE_ADORNMENT = re.compile(r"^([=\-~^\"'*#+`])\1{2,}\s*$")


def split_sections(rst: str) -> list[tuple[str, str]]:
    """Split a reST file at its section titles: [(title, raw body)], title text cleaned."""
    lines = rst.expandtabs(4).splitlines()
    sections: list[tuple[str, list[str]]] = [("", [])]
    i = 0
    while i < len(lines):
        line = lines[i]
        nxt = lines[i + 1] if i + 1 < len(lines) else ""
        is_title = (
            line.strip()
            and not line.startswith(" ")
            and not _TITLE_ADORNMENT.match(line)
            and _TITLE_ADORNMENT.match(nxt)
            and len(nxt.strip()) >= len(line.strip())
        )
        if is_title:
            if sections[-1][1] and _TITLE_ADORNMENT.match(sections[-1][1][-1]):
                sections[-1][1].pop()  # the overline of an over-and-underlined title
            sections.append((clean_inline(line.strip()), []))
            i += 2
            continue
        sections[-1][1].append(line)
        i += 1
    return [(title, "\n".join(body)) for title, body in sections]


@dataclass(frozen=True)
class Section:
    source: str
    title: str
    text: str


def load_sections(docs_dir: Path) -> list[Section]:
    """Every non-empty documentation section, in a stable order."""
    if not docs_dir.is_dir():
        raise SystemExit(
            f"documentation sources not found at {docs_dir}; install them with "
            "`apt-get install python3-doc` or pass --docs-dir"
        )
    sections = []
    for path in sorted(docs_dir.rglob("*.rst.txt")):
        rel = path.relative_to(docs_dir).as_posix()
        if rel.split("/", 1)[0] in SKIPPED_DOC_DIRS:
            continue
        for title, body in split_sections(path.read_text(encoding="utf-8", errors="replace")):
            text = clean_rst(body).strip()
            if len(text) >= 40:
                sections.append(Section(rel, title, text))
    return sections


def is_validation_file(source: str, every_nth: int) -> bool:
    """Held-out files: a stable hash of the path, independent of the file list."""
    digest = sum((i + 1) * b for i, b in enumerate(source.encode()))
    return digest % every_nth == 0


def section_documents(sections: list[Section], cfg: TrainConfig) -> list[str]:
    """Training text units: chat-wrapped sections and plain file runs ending in <|endoftext|>."""
    rng = np.random.default_rng([cfg.seed, 1])
    docs: list[str] = []
    current: list[str] = []
    previous_source = None
    for section in sections:
        if section.source != previous_source and current:
            docs.append("\n\n".join(current) + "<|endoftext|>")
            current = []
        previous_source = section.source
        if section.title and rng.random() < cfg.chat_fraction:
            prompt = CHAT_PROMPTS[int(rng.integers(len(CHAT_PROMPTS)))].format(title=section.title)
            docs.append(
                f"<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n"
                f"{section.text}<|im_end|>\n<|endoftext|>"
            )
        else:
            current.append(f"{section.title}\n\n{section.text}" if section.title else section.text)
    if current:
        docs.append("\n\n".join(current) + "<|endoftext|>")
    return docs


# --------------------------------------------------------------------------------------------
# Tokenizer: byte-level BPE with Qwen's special tokens at the end of the vocabulary.
# --------------------------------------------------------------------------------------------


def train_tokenizer(texts: list[str], vocab_size: int) -> Tokenizer:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - len(SPECIAL_TOKENS) - len(ADDED_TOKENS),
        min_frequency=2,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    tokenizer.add_special_tokens(
        [AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS]
    )
    tokenizer.add_tokens([AddedToken(t, special=False, normalized=False) for t in ADDED_TOKENS])
    if tokenizer.get_vocab_size(with_added_tokens=True) != vocab_size:
        raise SystemExit(
            f"tokenizer has {tokenizer.get_vocab_size(with_added_tokens=True)} tokens, "
            f"expected {vocab_size}: the corpus is too small for this vocabulary"
        )
    return tokenizer


def encode_documents(tokenizer: Tokenizer, docs: list[str]) -> np.ndarray:
    encoded = tokenizer.encode_batch(docs, add_special_tokens=False)
    return np.concatenate([np.asarray(e.ids, dtype=np.int32) for e in encoded])


# --------------------------------------------------------------------------------------------
# Model: mlx-lm's qwen3_5 plus the MTP head.
# --------------------------------------------------------------------------------------------


def hf_config(shape: ModelShape, tokenizer: Tokenizer) -> dict:
    """config.json in the original Qwen3.5 (Qwen3_5ForConditionalGeneration) layout."""
    eos = tokenizer.token_to_id(EOS_TOKEN)
    pad = tokenizer.token_to_id(PAD_TOKEN)
    rotary_pairs = int(shape.head_dim * shape.partial_rotary_factor) // 2
    mrope = [rotary_pairs - 2 * (rotary_pairs // 3), rotary_pairs // 3, rotary_pairs // 3]
    text_config = {
        "model_type": "qwen3_5_text",
        "architectures": ["Qwen3_5ForCausalLM"],
        **{k: v for k, v in asdict(shape).items() if k not in ("rope_theta",)},
        "layer_types": [
            "full_attention" if (i + 1) % shape.full_attention_interval == 0 else "linear_attention"
            for i in range(shape.num_hidden_layers)
        ],
        "attention_bias": False,
        "attn_output_gate": True,
        "hidden_act": "silu",
        "mamba_ssm_dtype": "float32",
        "mtp_num_hidden_layers": 1,
        "mtp_use_dedicated_embeddings": False,
        "rope_parameters": {
            "mrope_interleaved": True,
            "mrope_section": mrope,
            "partial_rotary_factor": shape.partial_rotary_factor,
            "rope_theta": shape.rope_theta,
            "rope_type": "default",
        },
        "tie_word_embeddings": True,
        "eos_token_id": eos,
        "pad_token_id": pad,
        "bos_token_id": None,
        "dtype": "float32",
        "use_cache": True,
    }
    return {
        "architectures": ["Qwen3_5ForConditionalGeneration"],
        "model_type": "qwen3_5",
        "text_config": text_config,
        "tie_word_embeddings": True,
        "eos_token_id": eos,
        "pad_token_id": pad,
        "torch_dtype": "float32",
        "transformers_version": "4.57.1",
    }


class DemoModel(nn.Module):
    """The target (mlx-lm's qwen3_5 Model) and its MTP head, trained together."""

    def __init__(self, config: dict):
        super().__init__()
        # A copy: mlx-lm's args rewrite rope_parameters in place ("rope_type" -> "type").
        self.target = qwen3_5.Model(qwen3_5.ModelArgs.from_dict(copy.deepcopy(config)))
        self.mtp = ReferenceMTP(self.target.language_model.args)

    @property
    def embed(self) -> nn.Embedding:
        return self.target.language_model.model.embed_tokens

    def logits(self, hidden: mx.array) -> mx.array:
        return self.embed.as_linear(hidden)  # tied embeddings: the shared LM head

    def hidden(self, tokens: mx.array) -> mx.array:
        return self.target.language_model.model(tokens)

    def mtp_logits(self, hidden: mx.array, next_tokens: mx.array) -> mx.array:
        return self.logits(self.mtp(hidden, self.embed(next_tokens)))


def loss_terms(model: DemoModel, window: mx.array) -> tuple[mx.array, mx.array]:
    """Mean CE of the next token and of the token after next over a (B, T + 2) window."""
    inputs, next_tokens, after_next = window[:, :-2], window[:, 1:-1], window[:, 2:]
    hidden = model.hidden(inputs)
    main = nn.losses.cross_entropy(model.logits(hidden), next_tokens, reduction="mean")
    mtp = nn.losses.cross_entropy(
        model.mtp_logits(hidden, next_tokens), after_next, reduction="mean"
    )
    return main, mtp


# --------------------------------------------------------------------------------------------
# The original HF layout.
# --------------------------------------------------------------------------------------------


def hf_shards(model: DemoModel, num_shards: int = 2) -> list[dict[str, mx.array]]:
    """The trained tensors in the original HF layout (renamed, conv1d (C, 1, K), offset norms;
    node.checkpoints.layouts inverts mlx-lm's sanitize), split into shards of about equal
    bytes in checkpoint order with ``mtp.*`` in the last one."""
    main = hf_main_weights(dict(tree_flatten(model.target.parameters())))
    mtp = hf_mtp_weights(dict(tree_flatten(model.mtp.parameters())))
    names = sorted(main, key=hf_sort_key)
    total = sum(main[n].nbytes for n in names)
    shards: list[dict[str, mx.array]] = [{} for _ in range(num_shards)]
    seen = 0
    for name in names:
        shards[min(num_shards - 1, seen * num_shards // total)][name] = main[name]
        seen += main[name].nbytes
    shards[-1].update({n: mtp[n] for n in sorted(mtp, key=hf_sort_key)})
    return shards


def write_checkpoint(out_dir: Path, model: DemoModel, config: dict, tokenizer: Tokenizer) -> None:
    """Shards, index, config, generation config and tokenizer files, replacing ``out_dir``."""
    shards = hf_shards(model)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True)
    weight_map: dict[str, str] = {}
    for n, shard in enumerate(shards, start=1):
        name = f"model-{n:05d}-of-{len(shards):05d}.safetensors"
        mx.save_safetensors(str(out_dir / name), shard, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, name))
    total = sum(v.nbytes for shard in shards for v in shard.values())
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    (out_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    eos = [tokenizer.token_to_id(EOS_TOKEN), tokenizer.token_to_id(PAD_TOKEN)]
    generation = {"eos_token_id": eos, "pad_token_id": eos[1]}
    (out_dir / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    tokenizer.save(str(out_dir / "tokenizer.json"))
    (out_dir / "tokenizer_config.json").write_text(
        json.dumps(tokenizer_config(tokenizer), indent=2, sort_keys=True) + "\n"
    )


# --------------------------------------------------------------------------------------------
# Training.
# --------------------------------------------------------------------------------------------


def batch_at(tokens: np.ndarray, step: int, cfg: TrainConfig) -> mx.array:
    """The batch for ``step``: random windows from an RNG keyed by (seed, step), so a resumed
    run sees exactly the batches an uninterrupted run would."""
    rng = np.random.default_rng([cfg.seed, 2, step])
    starts = rng.integers(0, len(tokens) - cfg.seq_len - 2, size=cfg.batch_size)
    return mx.array(np.stack([tokens[s : s + cfg.seq_len + 2] for s in starts]))


def validation_windows(tokens: np.ndarray, cfg: TrainConfig, count: int = 48) -> mx.array:
    """Evenly spaced, non-overlapping held-out windows (the same for every run)."""
    width = cfg.seq_len + 2
    stride = max(width, (len(tokens) - width) // count)
    return mx.array(np.stack([tokens[i * stride : i * stride + width] for i in range(count)]))


def learning_rate(cfg: TrainConfig):
    warmup = optim.linear_schedule(cfg.lr * 0.01, cfg.lr, cfg.warmup_steps)
    decay = optim.cosine_decay(
        cfg.lr, max(1, cfg.steps - cfg.warmup_steps), cfg.lr * cfg.min_lr_ratio
    )
    return optim.join_schedules([warmup, decay], [cfg.warmup_steps])


def evaluate(model: DemoModel, windows: mx.array, chunk: int = 16) -> dict[str, float]:
    """Held-out loss of both heads, and teacher-forced MTP agreement: the MTP head's greedy
    draft for x_{t+2} from (h_t, x_{t+1}) against the target's greedy prediction at t+1."""
    main_sum = mtp_sum = agree = agree_n = 0.0
    main_acc = mtp_acc = 0.0
    for i in range(0, windows.shape[0], chunk):
        w = windows[i : i + chunk]
        inputs, next_tokens, after_next = w[:, :-2], w[:, 1:-1], w[:, 2:]
        hidden = model.hidden(inputs)
        logits = model.logits(hidden)
        mtp_logits = model.mtp_logits(hidden, next_tokens)
        main_sum += nn.losses.cross_entropy(logits, next_tokens, reduction="sum").item()
        mtp_sum += nn.losses.cross_entropy(mtp_logits, after_next, reduction="sum").item()
        target_greedy = logits.argmax(-1)
        draft = mtp_logits.argmax(-1)
        main_acc += (target_greedy == next_tokens).sum().item()
        mtp_acc += (draft == after_next).sum().item()
        agree += (draft[:, :-1] == target_greedy[:, 1:]).sum().item()
        agree_n += draft[:, :-1].size
    n = windows.shape[0] * (windows.shape[1] - 2)
    return {
        "val_main_loss": main_sum / n,
        "val_mtp_loss": mtp_sum / n,
        "val_main_top1": main_acc / n,
        "val_mtp_top1": mtp_acc / n,
        "val_mtp_agreement": agree / agree_n,
    }


def latest_train_losses(meta: dict) -> dict[str, float]:
    """The running (EMA) training losses of both heads at the last logged step."""
    logged = [e for e in meta["log"] if "train_main_loss" in e]
    last = logged[-1] if logged else {}
    return {
        key: meta.get(key, last.get(key, float("nan")))
        for key in ("train_main_loss", "train_mtp_loss")
    }


def save_state(work: Path, model: DemoModel, optimizer: optim.Optimizer, meta: dict) -> None:
    work.mkdir(parents=True, exist_ok=True)
    mx.save_safetensors(str(work / "model.tmp.safetensors"), dict(tree_flatten(model.parameters())))
    mx.save_safetensors(
        str(work / "optimizer.tmp.safetensors"), dict(tree_flatten(optimizer.state))
    )
    (work / "meta.tmp.json").write_text(json.dumps(meta, indent=2))
    for name in ("model.safetensors", "optimizer.safetensors", "meta.json"):
        stem, ext = name.split(".", 1)
        (work / f"{stem}.tmp.{ext}").replace(work / name)


def load_state(work: Path, model: DemoModel, optimizer: optim.Optimizer) -> dict | None:
    if not (work / "meta.json").exists():
        return None
    model.load_weights(list(mx.load(str(work / "model.safetensors")).items()))
    optimizer.state = tree_unflatten(list(mx.load(str(work / "optimizer.safetensors")).items()))
    return json.loads((work / "meta.json").read_text())


def train(
    model: DemoModel,
    train_tokens: np.ndarray,
    val: mx.array,
    cfg: TrainConfig,
    work: Path,
    max_seconds: float,
    save_every: int,
    log_every: int,
) -> dict:
    optimizer = optim.AdamW(learning_rate=learning_rate(cfg), betas=(0.9, 0.95), weight_decay=0.0)
    meta = load_state(work, model, optimizer) or {
        "train_config": asdict(cfg),
        "step": 0,
        "elapsed_s": 0.0,
        "tokens": 0,
        "log": [],
    }
    if meta["train_config"] != asdict(cfg):
        raise SystemExit(f"{work} holds a run with a different config; use another --work-dir")
    if meta["step"]:
        print(
            f"resuming at step {meta['step']} ({meta['elapsed_s'] / 60:.1f} min done)", flush=True
        )

    def loss_fn(m: DemoModel, window: mx.array):
        main, mtp = loss_terms(m, window)
        return main + cfg.mtp_weight * mtp, (main, mtp)

    loss_and_grad = nn.value_and_grad(model, loss_fn)
    state = [model.state, optimizer.state]

    # Not mx.compile'd: on the CPU backend the compiled step (unrolled GatedDeltaNet loops)
    # measured slower than eager.
    def step_fn(window: mx.array):
        (_, (main, mtp)), grads = loss_and_grad(model, window)
        grads, _ = optim.clip_grad_norm(grads, cfg.grad_clip)
        optimizer.update(model, grads)
        return main, mtp

    started = time.perf_counter() - meta["elapsed_s"]
    window_start, window_tokens = time.perf_counter(), 0
    while meta["step"] < cfg.steps:
        # The budget is cumulative over resumed runs; a rerun past it trains no further.
        if meta["elapsed_s"] >= max_seconds:
            print(f"time budget reached at step {meta['step']} of {cfg.steps}", flush=True)
            break
        main, mtp = step_fn(batch_at(train_tokens, meta["step"], cfg))
        mx.eval(state, main, mtp)
        meta["step"] += 1
        meta["tokens"] += cfg.batch_size * cfg.seq_len
        window_tokens += cfg.batch_size * cfg.seq_len
        for key, value in (("train_main_loss", main.item()), ("train_mtp_loss", mtp.item())):
            previous = meta.get(key)
            meta[key] = value if previous is None else 0.95 * previous + 0.05 * value
        meta["elapsed_s"] = time.perf_counter() - started
        if meta["step"] % log_every == 0 or meta["step"] == cfg.steps:
            tps = window_tokens / (time.perf_counter() - window_start)
            window_start, window_tokens = time.perf_counter(), 0
            print(
                f"step {meta['step']:5d}/{cfg.steps}  main {meta['train_main_loss']:.3f}  "
                f"mtp {meta['train_mtp_loss']:.3f}  lr {optimizer.learning_rate.item():.2e}  "
                f"{tps:,.0f} tok/s  {meta['elapsed_s'] / 60:.1f} min",
                flush=True,
            )
            meta["log"].append(
                {
                    "step": meta["step"],
                    "train_main_loss": meta["train_main_loss"],
                    "train_mtp_loss": meta["train_mtp_loss"],
                    "tok_s": tps,
                }
            )
        out_of_time = meta["elapsed_s"] >= max_seconds
        if meta["step"] % save_every == 0 or out_of_time or meta["step"] == cfg.steps:
            if meta["step"] % (save_every * 4) == 0:
                meta["log"].append({"step": meta["step"], **evaluate(model, val)})
                print("  eval " + json.dumps(meta["log"][-1]), flush=True)
            save_state(work, model, optimizer, meta)
    return meta


# --------------------------------------------------------------------------------------------
# Checking the written checkpoint: mlx_lm.load, the MTP weights round trip, greedy acceptance.
# --------------------------------------------------------------------------------------------


def greedy_acceptance(
    target: nn.Module, head: ReferenceMTP, prompts: list[list[int]], max_tokens: int, depth: int
) -> dict:
    """Per-draft acceptance of greedy speculative decoding with chains of up to ``depth``
    drafts (node.checkpoints.reference_mtp.measure_agreement), pooled over ``prompts``."""
    accepted = [0.0] * depth
    proposed = [0] * depth
    grams: list[tuple[int, ...]] = []
    for prompt in prompts:
        report = measure_agreement(target, head, prompt, n_tokens=max_tokens, depth=depth)
        for j, (rate, count) in enumerate(zip(report.per_depth, report.counts, strict=True)):
            accepted[j] += rate * count
            proposed[j] += count
        grams.extend(tuple(report.tokens[i : i + 4]) for i in range(len(report.tokens) - 3))
    return {
        "greedy_acceptance_per_depth": [
            a / max(1, n) for a, n in zip(accepted, proposed, strict=True)
        ],
        "greedy_drafts_per_depth": proposed,
        # How repetitive the greedy text is (1.0: no 4-gram repeats); loops inflate acceptance.
        "greedy_distinct_4grams": len(set(grams)) / max(1, len(grams)),
    }


def roundtrip_error(
    target: nn.Module, head: ReferenceMTP, reference: DemoModel, tokens: mx.array
) -> float:
    """Largest logit difference (both heads) between the loaded checkpoint and the trained model."""
    text_model = target.language_model
    hidden = text_model.model(tokens[:, :-1])
    embed = text_model.model.embed_tokens
    loaded = [embed.as_linear(hidden), embed.as_linear(head(hidden, embed(tokens[:, 1:])))]
    ref_hidden = reference.hidden(tokens[:, :-1])
    trained = [reference.logits(ref_hidden), reference.mtp_logits(ref_hidden, tokens[:, 1:])]
    return max(mx.abs(a - b).max().item() for a, b in zip(loaded, trained, strict=True))


def check_checkpoint(
    path: Path, val_sections: list[Section], seed: int, reference: DemoModel | None = None
) -> dict:
    """Load the written checkpoint the way users do and measure it (and, given the trained
    model, check that the files reproduce its logits)."""
    from mlx_lm import generate, load

    target, tokenizer = load(str(path))
    config = json.loads((path / "config.json").read_text())
    head = load_reference_mtp(path, target)
    rng = np.random.default_rng([seed, 3])
    picks = rng.choice(len(val_sections), size=min(24, len(val_sections)), replace=False)
    prompts: list[list[int]] = []
    for n, i in enumerate(sorted(picks)):
        section = val_sections[int(i)]
        if n % 3 == 0 and section.title:
            messages = [{"role": "user", "content": f"Tell me about {section.title}."}]
            prompts.append(tokenizer.apply_chat_template(messages, add_generation_prompt=True))
        else:
            prompts.append(tokenizer.encode(section.text)[:24])
    stats = greedy_acceptance(target, head, prompts, max_tokens=48, depth=3)
    samples = {}
    for prompt in ("The list data type", "To open a file for reading,"):
        samples[prompt] = generate(target, tokenizer, prompt, max_tokens=48, verbose=False)
    chat = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Tell me about dictionaries."}], add_generation_prompt=True
    )
    samples["<chat> Tell me about dictionaries."] = generate(
        target, tokenizer, chat, max_tokens=48, verbose=False
    )
    size = sum(f.stat().st_size for f in path.iterdir())
    params = sum(v.size for _, v in tree_flatten(target.parameters())) + sum(
        v.size for _, v in tree_flatten(head.parameters())
    )
    if reference is not None:
        sample = mx.array([prompts[1] + prompts[2]])
        stats["roundtrip_max_logit_error"] = roundtrip_error(target, head, reference, sample)
    return {
        **stats,
        "samples": samples,
        "checkpoint_bytes": size,
        "parameters": params,
        "declares_mtp": config["text_config"]["mtp_num_hidden_layers"],
    }


# --------------------------------------------------------------------------------------------
# Command line.
# --------------------------------------------------------------------------------------------


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--docs-dir", type=Path, default=DEFAULT_DOCS)
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="checkpoint directory to write")
    p.add_argument("--work-dir", type=Path, default=DEFAULT_WORK, help="resumable training state")
    p.add_argument("--fresh", action="store_true", help="discard the state in --work-dir first")
    p.add_argument("--steps", type=int, default=TrainConfig.steps)
    p.add_argument("--max-minutes", type=float, default=35.0, help="wall-clock budget of this run")
    p.add_argument("--seed", type=int, default=TrainConfig.seed)
    p.add_argument("--batch-size", type=int, default=TrainConfig.batch_size)
    p.add_argument("--seq-len", type=int, default=TrainConfig.seq_len)
    p.add_argument("--lr", type=float, default=TrainConfig.lr)
    p.add_argument("--mtp-weight", type=float, default=TrainConfig.mtp_weight)
    p.add_argument("--vocab-size", type=int, default=ModelShape.vocab_size)
    p.add_argument("--save-every", type=int, default=25)
    p.add_argument("--log-every", type=int, default=20)
    p.add_argument("--check-only", action="store_true", help="only measure the checkpoint at --out")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    cfg = TrainConfig(
        seed=args.seed,
        steps=args.steps,
        batch_size=args.batch_size,
        seq_len=args.seq_len,
        lr=args.lr,
        mtp_weight=args.mtp_weight,
        warmup_steps=min(TrainConfig.warmup_steps, max(1, args.steps // 10)),
    )
    shape = ModelShape(vocab_size=args.vocab_size)
    sections = load_sections(args.docs_dir)
    val_sections = [s for s in sections if is_validation_file(s.source, cfg.val_every_nth_file)]
    train_sections = [
        s for s in sections if not is_validation_file(s.source, cfg.val_every_nth_file)
    ]
    if args.check_only:
        print(json.dumps(check_checkpoint(args.out, val_sections, cfg.seed), indent=2))
        return 0
    if args.fresh and args.work_dir.exists():
        shutil.rmtree(args.work_dir)
    args.work_dir.mkdir(parents=True, exist_ok=True)

    tokenizer_path = args.work_dir / "tokenizer.json"
    if tokenizer_path.exists():
        tokenizer = Tokenizer.from_file(str(tokenizer_path))
    else:
        t0 = time.perf_counter()
        texts = [f"{s.title}\n\n{s.text}" for s in train_sections]
        tokenizer = train_tokenizer(texts, shape.vocab_size)
        tokenizer.save(str(tokenizer_path))
        print(
            f"tokenizer: {shape.vocab_size} tokens in {time.perf_counter() - t0:.1f} s", flush=True
        )
    train_tokens = encode_documents(tokenizer, section_documents(train_sections, cfg))
    val_tokens = encode_documents(tokenizer, section_documents(val_sections, cfg))
    print(
        f"corpus: {len(train_sections)} train / {len(val_sections)} val sections, "
        f"{len(train_tokens):,} / {len(val_tokens):,} tokens",
        flush=True,
    )

    config = hf_config(shape, tokenizer)
    mx.random.seed(cfg.seed)
    model = DemoModel(config)
    n_params = sum(v.size for _, v in tree_flatten(model.parameters()))
    print(f"model: {n_params:,} parameters ({n_params * 4 / 2**20:.1f} MiB fp32)", flush=True)
    mx.eval(model.parameters())

    meta = train(
        model,
        train_tokens,
        validation_windows(val_tokens, cfg),
        cfg,
        args.work_dir,
        max_seconds=args.max_minutes * 60,
        save_every=args.save_every,
        log_every=args.log_every,
    )
    finished = meta["step"] >= cfg.steps
    if not finished:
        print("exporting the model as it is; rerun with the same arguments to finish", flush=True)
    write_checkpoint(args.out, model, config, tokenizer)
    final = evaluate(model, validation_windows(val_tokens, cfg))
    checked = check_checkpoint(args.out, val_sections, cfg.seed, reference=model)
    summary = {
        "model": {"parameters": n_params, **asdict(shape)},
        "training": {
            **asdict(cfg),
            "completed_steps": meta["step"],
            "tokens_seen": meta["tokens"],
            "minutes": meta["elapsed_s"] / 60,
        },
        "corpus": {
            "source": "CPython 3.11 documentation (Debian python3-doc reST sources)",
            "train_tokens": len(train_tokens),
            "val_tokens": len(val_tokens),
        },
        "final": {
            **latest_train_losses(meta),
            **final,
            **{k: v for k, v in checked.items() if k != "samples"},
        },
        "samples": checked["samples"],
    }
    (args.out / "training_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary, indent=2), flush=True)
    return 0 if finished else 3


if __name__ == "__main__":
    raise SystemExit(main())
