#!/usr/bin/env python3
"""Writes tests/data/tokenizer_reference.json: Hugging Face token ids and chat renderings for the
SmolLM2-135M-Instruct GGUF, which tests/tokenizer/test_tokenizer.cpp compares against.

    pip install transformers==5.24.0 tokenizers==0.23.3 gguf==0.19.0 jinja2==3.1.6 numpy
    python3 tests/reference/make_tokenizer_reference.py [--gguf PATH] [--out PATH]

Two Hugging Face tokenizers are built from the same GGUF vocabulary and merges:

* "gguf_loader": exactly what transformers' GGUF integration builds (`convert_gguf_tokenizer`, the function
  `AutoTokenizer.from_pretrained(dir, gguf_file=...)` calls). Its table of pre-tokenizers has no entry for
  `tokenizer.ggml.pre = "smollm"`, so it falls back to GPT-2's ByteLevel regex alone.
* "model": the same tokenizer with SmolLM2's own pre-tokenizer from its tokenizer.json on the Hub,
  Sequence[Digits(individual_digits=True), ByteLevel(add_prefix_space=False, use_regex=True)] -- the split
  the model was trained with, and the one llama.cpp uses for "smollm". This is the one grun follows by default.

The metadata is read with the `gguf` package rather than through `AutoTokenizer`, because transformers' own
GGUF reader imports torch, which is not needed for a tokenizer; the conversion code is transformers' own.
"""
import argparse
import importlib.metadata
import json
import os
import platform
import random
import sys
from pathlib import Path

import gguf
import jinja2
import tokenizers
import transformers
from gguf import GGUFReader
from tokenizers import Tokenizer, pre_tokenizers
from transformers import PreTrainedTokenizerFast
from transformers.convert_slow_tokenizer import bytes_to_unicode
from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_TOKENIZER_MAPPING, convert_gguf_tokenizer

MODEL_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def default_model_path() -> Path:
    if os.environ.get("GRUN_MODEL"):
        return Path(os.environ["GRUN_MODEL"])
    cache = Path(os.environ.get("GRUN_CACHE_DIR", Path.home() / ".cache" / "grun"))
    return cache / "models" / MODEL_NAME


def read_metadata(path: Path) -> dict:
    reader = GGUFReader(str(path))
    return {k: f.contents() for k, f in reader.fields.items() if k.startswith("tokenizer.") or k == "general.architecture"}


def build_tokenizers(md: dict):
    tokenizer_dict = {
        name: md[f"tokenizer.{key}"]
        for key, name in GGUF_TOKENIZER_MAPPING["tokenizer"].items()
        if f"tokenizer.{key}" in md
    }
    loader, _ = convert_gguf_tokenizer(md["general.architecture"], tokenizer_dict)
    model = Tokenizer.from_str(loader.to_str())
    model.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True),
        ]
    )
    return loader, model


def test_strings() -> list[str]:
    fixed = [
        "", " ", "  ", "a", "A", "\n", "\t", "\r\n", "Hello world", "Hello, world!", " Hello world",
        "Hello world ", "hello   world", "The quick brown fox jumps over the lazy dog.",
        "I'm here, you're there, we've gone, they'll come, he'd go, it's fine, don't.",
        "I'M HERE, YOU'RE THERE", "'s 't 're 've 'm 'll 'd", "rock'n'roll", "O'Neil's dog's bone",
        "quotes: \"double\" and 'single' and `back`", "‘curly’ “quotes”",
        "0", "7", "42", "1234567890", "3.14159265358979", "-273.15", "1,000,000", "1e-9", "0x7fffffff",
        "version 2.0.1-rc3", "phone: +1 (555) 123-4567", "2025-02-24T12:34:56Z", "x  1", "x  12", "a 1 b 22 c 333",
        "Ⅻ ² ³ ½ ١٢٣ ४२ 五十", "٣.١٤", "𝟘𝟙𝟚",
        "日本語のテキストです。", "中文文本，包含标点符号。", "한국어 텍스트입니다.", "Привет, мир!", "Ελληνικά γράμματα",
        "مرحبا بالعالم", "שלום עולם", "नमस्ते दुनिया", "ภาษาไทย", "Tiếng Việt có dấu", "Zürich Straße Ångström",
        "naïve café résumé", "e\u0301 a\u0300 o\u0308 n\u0303", "Z\u0351\u036b\u0343a\u0310\u0357l\u0300g\u0358o",
        "ﬁ ﬂ ﬃ", "Ａｂｃ　全角", "\u00a0non-breaking\u00a0space", "ideographic\u3000space", "thin\u2009space",
        "line\u2028separator", "para\u2029sep", "nel\x85char", "zero\u200bwidth\u200cjoiner\u200d",
        "soft\u00adhyphen", "mongolian\u180evowel", "figure\u2007space\u202fnarrow\u205fmath",
        "separators\x1c\x1d\x1e\x1fend", "ogham\u1680space", "en\u2002em\u2003spaces", "bidi \u202eevil\u202c text", "\ufeffBOM at start",
        "😀", "👍🏽", "👨‍👩‍👧‍👦 family", "🇩🇪🇯🇵 flags", "emoji😀in😀text", "❤️ red heart", "🤖 robots 🚀 rockets",
        "√∑∫∞≠≤≥ math", "α+β=γ", "x² + y² = z²", "E = mc²", "→ ← ↑ ↓ ⇒", "© ® ™ § ¶ † ‡", "€100 £50 ¥1000 ₹20 $5",
        "  leading spaces", "trailing spaces   ", "\t\ttabs\tinside\t", "many     spaces     between",
        "line1\nline2\nline3", "line1\n\nline2", "\n\n\n\n", "para\n\n\n\nnext", " \n \n ", "\r\n\r\nwindows",
        "mixed \t\n whitespace \x0b\x0c end", "   \n", "\n   ", "word\n    indented", "a\tb\tc\n1\t2\t3",
        "def f(x):\n    return x * 2\n", "for (int i = 0; i < n; ++i) { sum += a[i]; }",
        "#include <iostream>\nint main() { std::cout << \"hi\\n\"; }", "if (a && b || !c) return -1;",
        "const auto& [k, v] = *it;", "x => x.map(y => y ** 2)", "SELECT * FROM users WHERE id = 42;",
        "<html><body class=\"main\">Hi</body></html>", "{\"key\": [1, 2, 3], \"nested\": {\"a\": null}}",
        "https://example.com/path?query=1&b=2#frag", "user.name+tag@example.co.uk", "C:\\Windows\\System32",
        "/usr/local/bin/python3", "$ ls -la | grep foo > out.txt 2>&1", "```python\nprint('hi')\n```",
        "# Heading\n\n- item 1\n- item 2\n\n**bold** _italic_", "| a | b |\n|---|---|\n| 1 | 2 |",
        "!!!", "???", "...", "---", "___", "***", "!?!?", "a...b", "(parenthetical)", "[brackets]", "{braces}",
        "@user #hashtag", "snake_case_name", "camelCaseName", "PascalCaseName", "SCREAMING_CASE", "kebab-case-name",
        "don't", "Don't", "DON'T", "it's", "It’s", "y'all'd've",
        "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|im_start|>user\nHello<|im_end|>\n",
        "<|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>user\nHi!<|im_end|>\n<|im_start|>assistant\n",
        "text<|endoftext|>more", "<|im_start|><|im_end|>", "<|im_start", "im_end|>", "<|im_end|>>", "<<|im_start|>",
        "<repo_name>grun<file_sep>main.cpp", "<filename>a.py<gh_stars>10", "<jupyter_code>x=1<jupyter_output>1",
        "<|unknown_special|>", "< |im_start| >", "<|IM_START|>",
        "The year 1999 and 2024, numbers 007 and 12.5%.", "Call me at 555-0100 or 555 0199.",
        "Who was the author of 'Harry Potter'? J.K. Rowling wrote it in 1997.",
        "Question: What is the capital of France?\nAnswer: Paris.",
    ]
    rng = random.Random(20250224)
    pool = (
        list("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789")
        + list(" \t\n\r.,;:!?'\"()[]{}<>-_=+*/\\|@#$%^&~`")
        + list("éüßøñçÅ日本語中文한국어Привет١٢٣४२½²😀👍🏽🚀❤\u0301\u0308\u00a0\u3000\u2028\u200d")
        + ["'s", "'re", "  ", "\n\n", "   ", "<|im_end|>", "123", "..."]
    )
    generated = []
    for n in range(110):
        length = rng.randint(1, 40)
        generated.append("".join(rng.choice(pool) for _ in range(length)))
    words = ["the", "model", "forget", "retain", "unlearning", "gate", " ", "  ", "\n", "'s", "42", "3.5", "日本",
             "😀", "x_y", "(", ")", ",", ".", "don't", "α", "—", "\t"]
    for n in range(40):
        generated.append("".join(rng.choice(words) + rng.choice(["", " ", "  ", "\n"]) for _ in range(rng.randint(2, 25))))
    return fixed + generated


def conversations() -> list[dict]:
    return [
        {"messages": [{"role": "user", "content": "What is the capital of France?"}], "add_generation_prompt": True},
        {"messages": [{"role": "user", "content": "What is the capital of France?"}], "add_generation_prompt": False},
        {"messages": [{"role": "system", "content": "You answer briefly."},
                      {"role": "user", "content": "Who wrote Hamlet?"}], "add_generation_prompt": True},
        {"messages": [{"role": "user", "content": "Hi!"}, {"role": "assistant", "content": "Hello! How can I help?"},
                      {"role": "user", "content": "Tell me a joke.\nMake it short."}], "add_generation_prompt": True},
        {"messages": [{"role": "user", "content": "  spaces, ünïcödé 日本語 😀 and\n\nnewlines  "}],
         "add_generation_prompt": True},
        {"messages": [{"role": "user", "content": ""}], "add_generation_prompt": True},
        {"messages": [{"role": "system", "content": "S"}, {"role": "user", "content": "U"},
                      {"role": "assistant", "content": "A"}], "add_generation_prompt": False},
    ]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gguf", type=Path, default=default_model_path())
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "data" / "tokenizer_reference.json")
    args = parser.parse_args()
    if not args.gguf.is_file():
        print(f"model not found: {args.gguf} (run cmake/fetch_model.sh or set GRUN_MODEL)", file=sys.stderr)
        return 1

    md = read_metadata(args.gguf)
    loader, model = build_tokenizers(md)
    literal = Tokenizer.from_str(model.to_str())
    literal.encode_special_tokens = True  # special-token text is tokenized as ordinary text

    spelled = set(md["tokenizer.ggml.tokens"])
    unrepresentable = {chr(b) for b, c in bytes_to_unicode().items() if b < 128 and c not in spelled}
    cases = []
    for text in test_strings():
        ids = model.encode(text, add_special_tokens=False).ids
        # Characters whose byte has no token (\x04, \x06, \x13, \x14, \x16, \x1d) are dropped by HF's BPE.
        assert model.decode(ids, skip_special_tokens=False) == "".join(c for c in text if c not in unrepresentable), repr(text)
        case = {"text": text, "ids": ids, "ids_literal": literal.encode(text, add_special_tokens=False).ids}
        loader_ids = loader.encode(text, add_special_tokens=False).ids
        if loader_ids != ids:
            case["ids_gguf_loader"] = loader_ids
        cases.append(case)
    tokens = md["tokenizer.ggml.tokens"]
    hf = PreTrainedTokenizerFast(
        tokenizer_object=model,
        chat_template=md["tokenizer.chat_template"],
        bos_token=tokens[md["tokenizer.ggml.bos_token_id"]],
        eos_token=tokens[md["tokenizer.ggml.eos_token_id"]],
        unk_token=tokens[md["tokenizer.ggml.unknown_token_id"]],
        pad_token=tokens[md["tokenizer.ggml.padding_token_id"]],
    )
    chats = []
    for conv in conversations():
        text = hf.apply_chat_template(conv["messages"], tokenize=False, add_generation_prompt=conv["add_generation_prompt"])
        ids = model.encode(text, add_special_tokens=False).ids
        chats.append(dict(conv, text=text, ids=ids))

    out = {
        "model_file": MODEL_NAME,
        "tokenizer_ggml_pre": md["tokenizer.ggml.pre"],
        "generator": "tests/reference/make_tokenizer_reference.py",
        "versions": {
            "python": platform.python_version(),
            "transformers": transformers.__version__,
            "tokenizers": tokenizers.__version__,
            "gguf": importlib.metadata.version("gguf"),
            "jinja2": jinja2.__version__,
        },
        "notes": "ids: HF tokenizers with SmolLM2's own pre-tokenizer (Digits individual + ByteLevel regex); "
                 "ids_literal: same with special tokens treated as text; ids_gguf_loader (only where it differs "
                 "from ids): transformers' GGUF loader as is (ByteLevel regex only). add_special_tokens=False everywhere.",
        "cases": cases,
        "chats": chats,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(out, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
    tmp.replace(args.out)
    differ = sum(1 for c in cases if "ids_gguf_loader" in c)
    print(f"wrote {args.out}: {len(cases)} strings ({differ} where the GGUF loader differs), {len(chats)} chats")
    return 0


if __name__ == "__main__":
    sys.exit(main())
