#!/usr/bin/env python3
"""Writes a tiny LLaMA model in GGUF format with random weights.

It is not a language model: its answers are noise. It exists so a real
llama.cpp server can load it in a fraction of a second and answer real
OpenAI-style requests, with no model download.

    python3 scripts/make_tiny_gguf.py OUT.gguf [--seed N] [--layers N]

Shape: hidden 64, 4 heads, feed-forward 128, a few layers, context 512.
Vocabulary: a byte-level SentencePiece-style vocabulary: <unk>, <s>,
</s>, the 256 byte tokens <0x00>..<0xFF>, and the word-start piece.
Needs the `gguf` and `numpy` packages (`pip install gguf`).
"""

import argparse

import numpy as np
from gguf import GGUFWriter, TokenType

HIDDEN = 64
HEADS = 4
FFN = 128
CONTEXT = 512


def vocabulary():
    """Tokens, scores and types of a byte-fallback SentencePiece vocab."""
    tokens = [b"<unk>", b"<s>", b"</s>"]
    types = [TokenType.UNKNOWN, TokenType.CONTROL, TokenType.CONTROL]
    for byte in range(256):
        tokens.append(f"<0x{byte:02X}>".encode())
        types.append(TokenType.BYTE)
    # The word-start piece, so a space is one token, as in real LLaMA vocabs.
    tokens.append("\u2581".encode())
    types.append(TokenType.NORMAL)
    scores = [0.0] * len(tokens)
    return tokens, scores, types


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", help="where to write the .gguf file")
    parser.add_argument("--seed", type=int, default=0, help="random seed")
    parser.add_argument("--layers", type=int, default=2, help="transformer blocks")
    args = parser.parse_args()

    rng = np.random.default_rng(args.seed)
    tokens, scores, types = vocabulary()
    vocab = len(tokens)

    writer = GGUFWriter(args.out, "llama")
    writer.add_name(f"tiny-random-llama-{args.seed}")
    writer.add_context_length(CONTEXT)
    writer.add_embedding_length(HIDDEN)
    writer.add_block_count(args.layers)
    writer.add_feed_forward_length(FFN)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(HEADS)
    writer.add_rope_dimension_count(HIDDEN // HEADS)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_file_type(0)  # all F32
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)
    writer.add_add_bos_token(True)
    writer.add_chat_template(
        "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}assistant: {% endif %}"
    )

    def weight(*shape):
        return (rng.standard_normal(shape) * 0.02).astype(np.float32)

    def ones(n):
        return np.ones(n, dtype=np.float32)

    # numpy shapes are (rows, columns); GGUF stores them reversed, which is
    # the order llama.cpp expects (e.g. token_embd is {HIDDEN, vocab}).
    writer.add_tensor("token_embd.weight", weight(vocab, HIDDEN))
    writer.add_tensor("output_norm.weight", ones(HIDDEN))
    writer.add_tensor("output.weight", weight(vocab, HIDDEN))
    for i in range(args.layers):
        writer.add_tensor(f"blk.{i}.attn_norm.weight", ones(HIDDEN))
        writer.add_tensor(f"blk.{i}.attn_q.weight", weight(HIDDEN, HIDDEN))
        writer.add_tensor(f"blk.{i}.attn_k.weight", weight(HIDDEN, HIDDEN))
        writer.add_tensor(f"blk.{i}.attn_v.weight", weight(HIDDEN, HIDDEN))
        writer.add_tensor(f"blk.{i}.attn_output.weight", weight(HIDDEN, HIDDEN))
        writer.add_tensor(f"blk.{i}.ffn_norm.weight", ones(HIDDEN))
        writer.add_tensor(f"blk.{i}.ffn_gate.weight", weight(FFN, HIDDEN))
        writer.add_tensor(f"blk.{i}.ffn_up.weight", weight(FFN, HIDDEN))
        writer.add_tensor(f"blk.{i}.ffn_down.weight", weight(HIDDEN, FFN))

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


if __name__ == "__main__":
    main()
