"""A GGUF Qwen2-VL and its mmproj (the vision tower) from a make_model.py folder, by
llama.cpp's own converter (convert_hf_to_gguf.py of a llama.cpp source tree): what a
llama.cpp-family server (llama-server, llama-box) loads with `--model` and `--mmproj`.

    python bench/gpu/make_gguf.py LLAMA_CPP_DIR MODEL_DIR OUT_DIR

The converter names a BPE tokenizer's pre-tokenizer by hashing how it splits a fixed text;
the folder's small byte-level tokenizer is none it knows, so it is declared Qwen2's (the
family's own): with random weights the text is noise, and images reach the model by
embedding, not by token ids. That tokenizer has no merges, and llama.cpp refuses a BPE
vocabulary without the merges key: one inert merge is written (two NUL bytes, which no
prompt holds).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any


def convert(llama_cpp: Path, model: Path, out: Path, mmproj: bool) -> Path:
    sys.path[:0] = [str(llama_cpp), str(llama_cpp / "gguf-py")]
    import convert_hf_to_gguf  # llama.cpp's own, from its tree (sys.path above)
    import gguf
    from conversion.base import TextModel

    TextModel.get_vocab_base_pre = lambda self, tokenizer: "qwen2"
    add_to_gguf = gguf.SpecialVocab.add_to_gguf

    def with_merges(vocab: Any, writer: Any, quiet: bool = False) -> None:
        if vocab.load_merges and not vocab.merges:
            vocab.merges = ["\u0100 \u0100"]  # byte 0x00 twice, in GPT-2's byte alphabet
        add_to_gguf(vocab, writer, quiet)

    gguf.SpecialVocab.add_to_gguf = with_merges
    target = out / (f"mmproj-{model.name}-f16.gguf" if mmproj else f"{model.name}-f16.gguf")
    sys.argv = ["convert_hf_to_gguf.py", str(model), "--outfile", str(target), "--outtype", "f16"]
    sys.argv += ["--mmproj"] if mmproj else []
    convert_hf_to_gguf.main()
    return target


if __name__ == "__main__":
    llama_cpp, model, out = (Path(a) for a in sys.argv[1:4])
    out.mkdir(parents=True, exist_ok=True)
    print(convert(llama_cpp, model, out, mmproj="--mmproj" in sys.argv[4:]))
