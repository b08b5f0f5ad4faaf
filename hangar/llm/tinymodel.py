"""A tiny llama-architecture model with random weights, written as a real GGUF file.

It loads in the real ``llama-server``, generates, embeds and answers chat requests (it carries
a ChatML template), in well under a megabyte: for tests and demos that need a real engine but
no real model. The weights come from a seeded generator, so one seed always gives the same
bytes. Its text is noise; what it is good for is structure, streaming and determinism.
"""

from __future__ import annotations

import os
import string
import tempfile
from pathlib import Path

import numpy as np
from gguf import GGUFWriter, LlamaFileType, TokenType
from pydantic import BaseModel, ConfigDict, Field

ARCHITECTURE = "llama"
UNKNOWN, BEGIN, END = "<unk>", "<s>", "</s>"
CHAT_START, CHAT_END = "<|im_start|>", "<|im_end|>"
WORD_START = "\u2581"  # SentencePiece's marker for a word boundary
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
_WORDS = (
    "the", "of", "and", "to", "in", "is", "it", "hello", "world", "model", "machine",
    "say", "one", "two", "three", "yes", "no", "tiny", "test", "hangar", "token", "stream",
)  # fmt: skip


class TinyModelSpec(BaseModel):
    """The shape of the model; the defaults give a 64-wide, 2-layer model of about 700 KB."""

    model_config = ConfigDict(frozen=True)

    name: str = "hangar-tiny"
    seed: int = 0
    embedding: int = Field(default=64, ge=8, le=1024)
    layers: int = Field(default=2, ge=1, le=16)
    heads: int = Field(default=4, ge=1, le=64)
    kv_heads: int = Field(default=2, ge=1, le=64)
    feed_forward: int = Field(default=128, ge=8, le=8192)
    context: int = Field(default=8192, ge=32, le=32768)  # the longest context it takes


def vocabulary() -> tuple[list[str], list[float], list[TokenType]]:
    """A SentencePiece-style vocabulary: special tokens, all 256 byte fallbacks (so any text
    tokenizes), printable characters, and a few whole words (scored above the characters)."""
    tokens = [UNKNOWN, BEGIN, END, CHAT_START, CHAT_END]
    types = [TokenType.UNKNOWN, TokenType.CONTROL, TokenType.CONTROL]
    types += [TokenType.CONTROL, TokenType.CONTROL]
    scores = [0.0] * len(tokens)
    for byte in range(256):
        tokens.append(f"<0x{byte:02X}>")
        types.append(TokenType.BYTE)
        scores.append(0.0)
    pieces = [WORD_START, "\n"]
    pieces += [ch for ch in string.ascii_letters + string.digits + string.punctuation]
    pieces += [WORD_START + ch for ch in string.ascii_lowercase]
    for piece in pieces:
        tokens.append(piece)
        types.append(TokenType.NORMAL)
        scores.append(-1.0 - len(scores) / 1000)
    for word in _WORDS:
        tokens.append(WORD_START + word)
        types.append(TokenType.NORMAL)
        scores.append(float(len(word)))
    return tokens, scores, types


def write_tiny_model(path: Path, spec: TinyModelSpec | None = None) -> Path:
    """Write the model to ``path`` (atomically: readers see no half-written file); return it."""
    spec = spec or TinyModelSpec()
    if spec.embedding % spec.heads or spec.heads % spec.kv_heads:
        raise ValueError("embedding must divide by heads, and heads by kv_heads")
    tokens, scores, types = vocabulary()
    rng = np.random.default_rng(spec.seed)
    head_dim = spec.embedding // spec.heads
    kv_width = head_dim * spec.kv_heads

    def linear(rows: int, columns: int) -> np.ndarray:
        # numpy's (rows, columns) is ggml's [columns, rows]: ``columns`` is the input width.
        weights = rng.standard_normal((rows, columns)) / np.sqrt(columns)
        return np.asarray(weights, dtype=np.float32)

    def ones(width: int) -> np.ndarray:
        return np.ones(width, dtype=np.float32)

    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor, staged = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(descriptor)
    try:
        writer = GGUFWriter(staged, ARCHITECTURE)
        writer.add_name(spec.name)
        writer.add_file_type(LlamaFileType.ALL_F32)
        writer.add_context_length(spec.context)
        writer.add_embedding_length(spec.embedding)
        writer.add_block_count(spec.layers)
        writer.add_feed_forward_length(spec.feed_forward)
        writer.add_head_count(spec.heads)
        writer.add_head_count_kv(spec.kv_heads)
        writer.add_layer_norm_rms_eps(1e-5)
        writer.add_rope_dimension_count(head_dim)
        writer.add_vocab_size(len(tokens))
        writer.add_tokenizer_model("llama")
        writer.add_token_list(tokens)
        writer.add_token_scores(scores)
        writer.add_token_types(types)
        writer.add_unk_token_id(tokens.index(UNKNOWN))
        writer.add_bos_token_id(tokens.index(BEGIN))
        writer.add_eos_token_id(tokens.index(END))
        writer.add_add_bos_token(True)
        writer.add_chat_template(CHATML_TEMPLATE)

        embeddings = np.asarray(rng.standard_normal((len(tokens), spec.embedding)), np.float32)
        output = linear(len(tokens), spec.embedding)
        # Ending tokens never win a greedy pick, so completions run to max_tokens.
        for ending in (END, CHAT_END):
            output[tokens.index(ending)] = 0.0
        writer.add_tensor("token_embd.weight", embeddings)
        writer.add_tensor("output_norm.weight", ones(spec.embedding))
        writer.add_tensor("output.weight", output)
        for layer in range(spec.layers):
            block = f"blk.{layer}"
            writer.add_tensor(f"{block}.attn_norm.weight", ones(spec.embedding))
            writer.add_tensor(f"{block}.attn_q.weight", linear(spec.embedding, spec.embedding))
            writer.add_tensor(f"{block}.attn_k.weight", linear(kv_width, spec.embedding))
            writer.add_tensor(f"{block}.attn_v.weight", linear(kv_width, spec.embedding))
            writer.add_tensor(f"{block}.attn_output.weight", linear(spec.embedding, spec.embedding))
            writer.add_tensor(f"{block}.ffn_norm.weight", ones(spec.embedding))
            writer.add_tensor(f"{block}.ffn_gate.weight", linear(spec.feed_forward, spec.embedding))
            writer.add_tensor(f"{block}.ffn_up.weight", linear(spec.feed_forward, spec.embedding))
            writer.add_tensor(f"{block}.ffn_down.weight", linear(spec.embedding, spec.feed_forward))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(staged, path)
    except BaseException:
        Path(staged).unlink(missing_ok=True)
        raise
    return path
