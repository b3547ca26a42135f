#!/usr/bin/env python3
"""Builds the reference models' English corpus and tokenizer, reproducibly.

Sources are openly licensed texts that Debian packages install (see models/README.md):
  bible-kjv (King James Version, public domain), python3.11-doc (Python documentation, PSF
  License), perl-doc (Perl documentation, GPL-1+ or Artistic), debian-reference-en (GPL-2+),
  debian-handbook (GPL-2+ or CC BY-SA 3.0), jargon-text (the Jargon File, public domain).

Steps: extract plain text, normalise, drop duplicate paragraphs (navigation, boilerplate),
cut long documents into pieces, and assign each piece to train / validation / test by a hash
of its name (about 98 / 1 / 1 percent). The test split is never used for training or tuning.
Then train a byte-level BPE tokenizer (Llama 3 pre-tokenizer) on the train split and write the
token streams the training script reads.

Outputs:
  models/corpus/{validation,test}.txt   committed
  models/corpus/train.txt               rebuilt by this script (not committed)
  models/tokenizer/                     tokenizer.json, tokenizer_config.json (committed)
  .reference-data/{train,validation}.bin  uint16 token ids, documents wrapped in BOS ... EOS

Run as root on Debian:  python3 scripts/build_corpus.py   (installs the packages it needs)
Needs the `tokenizers` and `numpy` Python packages.
"""
import glob
import gzip
import hashlib
import html.parser
import json
import os
import re
import shutil
import subprocess
import sys
import unicodedata

ROOT = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
CORPUS = os.path.join(ROOT, "models", "corpus")
TOKENIZER = os.path.join(ROOT, "models", "tokenizer")
DATA = os.path.join(ROOT, ".reference-data")
PACKAGES = ["bible-kjv", "bible-kjv-text", "python3.11-doc", "perl-doc", "debian-reference-en",
            "debian-handbook", "jargon-text"]
VOCAB_SIZE = 8192
PIECE_CHARS = 40_000
DOC_SEPARATOR = "\n\n\n"
LLAMA3_PATTERN = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|pad|>"]


def ensure_packages():
    missing = [p for p in PACKAGES if subprocess.run(["dpkg", "-s", p], capture_output=True).returncode != 0]
    if missing:
        print("installing", " ".join(missing), flush=True)
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        subprocess.run(["apt-get", "update", "-qq"], check=True, env=env)
        subprocess.run(["apt-get", "install", "-y", "-qq"] + missing, check=True, env=env, stdout=subprocess.DEVNULL)


class TextExtractor(html.parser.HTMLParser):
    """Visible text of an HTML page, with block elements on their own lines."""
    BLOCKS = {"p", "div", "br", "li", "ul", "ol", "dt", "dd", "dl", "h1", "h2", "h3", "h4", "h5", "h6", "pre",
              "table", "tr", "section", "blockquote", "title", "hr"}
    SKIP = {"script", "style", "nav", "head", "footer"}

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.parts = []
        self.skip = 0
        self.pre = 0

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag in self.SKIP or "related" in (a.get("class") or "") or "sphinxsidebar" in (a.get("class") or ""):
            self.skip += 1 if tag in self.SKIP or tag == "div" else 0
        if tag == "pre":
            self.pre += 1
        if tag in self.BLOCKS:
            self.parts.append("\n\n" if tag in ("p", "pre", "h1", "h2", "h3", "h4", "dt", "table") else "\n")

    def handle_endtag(self, tag):
        if tag in self.SKIP and self.skip:
            self.skip -= 1
        if tag == "pre" and self.pre:
            self.pre -= 1
        if tag in self.BLOCKS:
            self.parts.append("\n")

    def handle_data(self, data):
        if self.skip:
            return
        self.parts.append(data if self.pre else re.sub(r"\s+", " ", data))

    def text(self):
        return "".join(self.parts)


def html_text(path):
    with open(path, encoding="utf-8", errors="replace") as f:
        raw = f.read()
    # Sphinx pages: keep the main body only.
    m = re.search(r'<div class="body" role="main">(.*?)<div class="sphinxsidebar"', raw, re.S)
    if m:
        raw = m.group(1)
    p = TextExtractor()
    p.feed(raw)
    return p.text()


def normalise(text):
    text = unicodedata.normalize("NFC", text).replace("\r\n", "\n").replace("\r", "\n").replace("\t", "    ")
    text = text.replace("\u00b6", "")  # Sphinx permalink marks
    lines = [l.rstrip() for l in text.split("\n")]
    text = "\n".join(lines)
    text = re.sub(r"\n{3,}", "\n\n", text)
    return text.strip()


def documents():
    """Yields (name, text) for every source document, in a fixed order."""
    # King James Bible, a document per book.
    out = subprocess.run(["bible", "Genesis 1:1-Revelation 22:21"], capture_output=True, text=True, check=True).stdout
    book, chapter_lines, books = None, [], []
    for line in out.split("\n"):
        m = re.match(r"^([1-3]?\s?[A-Z][A-Za-z ]+?) (\d+)$", line)
        if m:
            name = m.group(1)
            if name != book:
                if book:
                    books.append((book, "\n".join(chapter_lines)))
                book, chapter_lines = name, []
            chapter_lines.append(f"\n{line}\n")
            continue
        v = re.match(r"^\s+\d+ (.*)$", line)
        if v:
            chapter_lines.append(v.group(1))
        elif line.strip() and chapter_lines:
            chapter_lines[-1] += " " + line.strip()
    if book:
        books.append((book, "\n".join(chapter_lines)))
    for name, text in books:
        yield f"kjv/{name}", text

    for path in sorted(glob.glob("/usr/share/doc/python3.11/html/**/*.html", recursive=True)):
        rel = os.path.relpath(path, "/usr/share/doc/python3.11/html")
        if rel.startswith(("_", "genindex", "py-modindex", "search", "whatsnew/changelog")):
            continue
        yield f"python/{rel}", html_text(path)

    for path in sorted(glob.glob("/usr/share/perl/5.*/pod/*.pod")):
        text = subprocess.run(["pod2text", "--utf8", path], capture_output=True).stdout.decode("utf-8", errors="replace")
        yield f"perl/{os.path.basename(path)}", text

    for path in sorted(glob.glob("/usr/share/debian-reference/*.en.html")):
        yield f"debian-reference/{os.path.basename(path)}", html_text(path)

    for path in sorted(glob.glob("/usr/share/doc/debian-handbook/html/en-US/*.html")):
        yield f"debian-handbook/{os.path.basename(path)}", html_text(path)

    jargon = "/usr/share/doc/jargon-text/jargon.txt.gz"
    if os.path.exists(jargon):
        yield "jargon/jargon", gzip.open(jargon, "rt", encoding="utf-8", errors="replace").read()


def pieces(name, text):
    """Cuts a long document at paragraph boundaries into pieces of about PIECE_CHARS."""
    paras = text.split("\n\n")
    cur, n, i = [], 0, 0
    for p in paras:
        cur.append(p)
        n += len(p) + 2
        if n >= PIECE_CHARS:
            yield f"{name}#{i}", "\n\n".join(cur)
            cur, n, i = [], 0, i + 1
    if cur:
        yield f"{name}#{i}", "\n\n".join(cur)


def split_of(name):
    h = int(hashlib.sha256(name.encode()).hexdigest(), 16) % 100
    return "test" if h == 0 else "validation" if h == 1 else "train"


def build_corpus():
    seen = set()
    splits = {"train": [], "validation": [], "test": []}
    stats = {}
    for name, text in documents():
        source = name.split("/")[0]
        kept = []
        for para in normalise(text).split("\n\n"):
            key = re.sub(r"\s+", " ", para).strip()
            if len(key) < 3:
                continue
            if len(key) >= 30:
                h = hashlib.sha1(key.encode()).digest()
                if h in seen:
                    continue
                seen.add(h)
            kept.append(para)
        text = "\n\n".join(kept)
        if len(text) < 200:
            continue
        for piece_name, piece in pieces(name, text):
            s = split_of(piece_name)
            splits[s].append(piece)
            st = stats.setdefault(source, {"train": 0, "validation": 0, "test": 0})
            st[s] += len(piece.encode())
    os.makedirs(CORPUS, exist_ok=True)
    for s, docs in splits.items():
        with open(os.path.join(CORPUS, f"{s}.txt"), "w", encoding="utf-8") as f:
            f.write(DOC_SEPARATOR.join(docs) + "\n")
    with open(os.path.join(CORPUS, "stats.json"), "w") as f:
        json.dump(stats, f, indent=1)
    return splits, stats


def train_tokenizer(train_docs):
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    tok = Tokenizer(models.BPE(ignore_merges=True))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(LLAMA3_PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE - len(SPECIALS), min_frequency=2, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=[])
    tok.train_from_iterator(train_docs, trainer, length=len(train_docs))
    tok.add_special_tokens(SPECIALS)
    bos = SPECIALS[0]
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tok.token_to_id(bos))])
    os.makedirs(TOKENIZER, exist_ok=True)
    tok.save(os.path.join(TOKENIZER, "tokenizer.json"))
    with open(os.path.join(TOKENIZER, "tokenizer_config.json"), "w") as f:
        json.dump({"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": SPECIALS[0], "eos_token": SPECIALS[1],
                   "pad_token": SPECIALS[2], "add_bos_token": True, "model_max_length": 1024}, f, indent=2)
    return tok


def write_tokens(tok, docs, path):
    import numpy as np
    bos, eos = tok.token_to_id(SPECIALS[0]), tok.token_to_id(SPECIALS[1])
    out = []
    for enc in tok.encode_batch(docs, add_special_tokens=False):
        out.append(bos)
        out.extend(enc.ids)
        out.append(eos)
    arr = np.array(out, dtype=np.uint16)
    arr.tofile(path)
    return len(arr)


def main():
    ensure_packages()
    splits, stats = build_corpus()
    for s, docs in splits.items():
        print(f"{s}: {len(docs)} pieces, {sum(len(d.encode()) for d in docs) / 1e6:.1f} MB")
    tok = train_tokenizer(splits["train"])
    os.makedirs(DATA, exist_ok=True)
    for s in ("train", "validation"):
        n = write_tokens(tok, splits[s], os.path.join(DATA, f"{s}.bin"))
        print(f"{s}: {n} tokens")


if __name__ == "__main__":
    main()
