"""The tiny model is a real GGUF file, the same bytes for the same seed."""

from __future__ import annotations

from pathlib import Path

import pytest
from gguf import GGUFReader

from hangar.llm.tinymodel import TinyModelSpec, vocabulary, write_tiny_model


def test_one_seed_gives_one_file_and_another_seed_another(tmp_path: Path) -> None:
    first = write_tiny_model(tmp_path / "a.gguf").read_bytes()
    again = write_tiny_model(tmp_path / "b.gguf").read_bytes()
    other = write_tiny_model(tmp_path / "c.gguf", TinyModelSpec(seed=1)).read_bytes()
    assert first == again
    assert first != other
    assert len(first) < 1024 * 1024
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.gguf", "b.gguf", "c.gguf"]


def test_it_reads_back_as_a_llama_model(tmp_path: Path) -> None:
    spec = TinyModelSpec(layers=3, embedding=32, heads=4, kv_heads=4)
    reader = GGUFReader(write_tiny_model(tmp_path / "m.gguf", spec))
    fields = {name: reader.fields[name] for name in reader.fields}
    architecture = fields["general.architecture"]
    assert bytes(architecture.parts[architecture.data[0]]).decode() == "llama"
    assert int(fields["llama.block_count"].parts[-1][0]) == 3
    assert int(fields["llama.embedding_length"].parts[-1][0]) == 32
    names = {tensor.name for tensor in reader.tensors}
    assert {"token_embd.weight", "output.weight", "blk.2.ffn_down.weight"} <= names
    tokens, _, _ = vocabulary()
    embedding = next(t for t in reader.tensors if t.name == "token_embd.weight")
    assert list(embedding.shape) == [32, len(tokens)]


def test_a_shape_that_does_not_divide_is_refused_and_leaves_nothing(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="divide"):
        write_tiny_model(tmp_path / "m.gguf", TinyModelSpec(embedding=30, heads=4))
    assert list(tmp_path.iterdir()) == []


def test_every_byte_has_a_fallback_token() -> None:
    tokens, scores, types = vocabulary()
    assert len(tokens) == len(set(tokens)) == len(scores) == len(types)
    assert all(f"<0x{byte:02X}>" in tokens for byte in range(256))
