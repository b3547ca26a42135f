#!/usr/bin/env python3
"""The SentencePiece ("llama") GGUF vocabulary fixture: a 1000-piece SentencePiece BPE model
trained here (Llama's settings: byte fallback, digits split, a dummy prefix, no normalization),
written to a vocabulary-only GGUF by llama.cpp's own convert_hf_to_gguf.py, and llama.cpp's
tokenization of the tokenizer test texts with it (ids with and without BOS, and the text it
decodes back), for the Swift tokenizer to match.

Run with the interpreter of scripts/compare_llamacpp.py (llama-cpp-python and sentencepiece):
  .venv-bench/bin/python scripts/make_spm_gguf_fixture.py
"""
import json
import os
import subprocess
import sys
import tempfile

ROOT = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from compare_llamacpp import llama_cpp_sources  # noqa: E402

OUT = os.path.join(ROOT, "Tests", "Fixtures", "gguf")


def main():
    import sentencepiece as spm
    from llama_cpp import Llama
    texts = [c["text"] for c in json.load(open(os.path.join(ROOT, "Tests", "Fixtures", "tokenizer_cases.json")))["llama2"]["cases"]]
    src = llama_cpp_sources()
    with tempfile.TemporaryDirectory() as d:
        spm.SentencePieceTrainer.train(
            input=os.path.join(ROOT, "models", "corpus", "validation.txt"), model_prefix=os.path.join(d, "tokenizer"),
            model_type="bpe", vocab_size=1000, byte_fallback=True, split_digits=True, add_dummy_prefix=True,
            remove_extra_whitespaces=False, normalization_rule_name="identity", allow_whitespace_only_pieces=True,
            unk_id=0, bos_id=1, eos_id=2, pad_id=-1, input_sentence_size=200000, shuffle_input_sentence=False,
            character_coverage=0.9995, num_threads=2, minloglevel=2)
        json.dump({"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 1000, "hidden_size": 64,
                   "intermediate_size": 128, "num_hidden_layers": 1, "num_attention_heads": 4, "num_key_value_heads": 4,
                   "max_position_embeddings": 256, "rms_norm_eps": 1e-5, "bos_token_id": 1, "eos_token_id": 2},
                  open(os.path.join(d, "config.json"), "w"))
        json.dump({"tokenizer_class": "LlamaTokenizer", "add_bos_token": True, "add_eos_token": False},
                  open(os.path.join(d, "tokenizer_config.json"), "w"))
        out = os.path.join(OUT, "spm-vocab.gguf")
        code = f"""
import sys
sys.path.insert(0, {os.path.join(src, 'gguf-py')!r}); sys.path.insert(0, {src!r})
sys.argv = ['convert_hf_to_gguf.py', {d!r}, '--vocab-only', '--outfile', {out!r}]
import convert_hf_to_gguf as c
c.main()
"""
        subprocess.run([sys.executable, "-c", code], check=True, cwd=src)
    llm = Llama(model_path=out, vocab_only=True, verbose=False)
    cases = []
    for t in texts:
        # special=True: control tokens written in the text are matched whole, as Peregrine's
        # tokenizer (and the tokenizers library) match added tokens.
        ids = llm.tokenize(t.encode("utf-8"), add_bos=True, special=True)
        plain = llm.tokenize(t.encode("utf-8"), add_bos=False, special=True)
        cases.append({"text": t, "ids": ids, "ids_no_special": plain,
                      "decoded": llm.detokenize(plain).decode("utf-8", errors="replace")})
    json.dump({"cases": cases}, open(os.path.join(OUT, "spm_cases.json"), "w"), indent=1, ensure_ascii=False)
    print(out, os.path.getsize(out), "bytes;", len(cases), "cases")


if __name__ == "__main__":
    main()
