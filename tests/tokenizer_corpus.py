"""A large mixed-script test corpus for the tokenizer, built deterministically without network.

Real text comes from the running Python's standard library (pydoc's English topic help, the
license, a fixed list of modules' source); the rest is generated from code points with a seeded
RNG: accented Latin (composed and decomposed), CJK (incl. extension blocks and the U+2B820..2B91F
range HF leaves unsplit), Hangul, Kana, emoji/ZWJ sequences, stacked combining marks, control and
format characters, a sample of every Unicode general category, over-long words, inline special
tokens and unusual whitespace. Lone surrogates are excluded (HF's tokenizer cannot take them).

`corpus()` -> {section: [lines]}; `all_lines()` flattens it. Run as a script to print sizes.
"""
from __future__ import annotations

import ast
import functools
import os
import random
import sys
import sysconfig
import unicodedata
from typing import Dict, List

CODE_FILES = ("textwrap.py", "argparse.py", "difflib.py", "json/decoder.py", "collections/__init__.py",
              "email/message.py", "http/client.py", "unittest/case.py", "statistics.py", "fractions.py",
              "calendar.py", "this.py")
# Modules whose docstrings (English prose, often with doctest snippets) add to pydoc's topics.
DOC_FILES = CODE_FILES + ("_pydecimal.py", "typing.py", "inspect.py", "subprocess.py", "threading.py",
                          "pathlib.py", "tarfile.py", "zipfile.py", "logging/__init__.py", "doctest.py",
                          "pydoc.py", "os.py", "shutil.py", "socket.py", "ssl.py", "enum.py", "dataclasses.py",
                          "functools.py", "heapq.py", "random.py", "turtle.py", "imaplib.py", "smtplib.py",
                          "ftplib.py", "mailbox.py", "configparser.py", "optparse.py", "locale.py", "codecs.py",
                          "gettext.py", "asyncio/base_events.py", "asyncio/streams.py", "pickle.py",
                          "urllib/request.py", "urllib/parse.py", "xml/dom/minidom.py", "sqlite3/__init__.py",
                          "string.py", "re/__init__.py", "datetime.py", "contextlib.py", "abc.py", "csv.py")


def _stdlib(path: str) -> List[str]:
    try:
        with open(os.path.join(sysconfig.get_paths()["stdlib"], path), encoding="utf-8") as f:
            return f.read().splitlines()
    except OSError:
        return []


def _docstrings(path: str) -> List[str]:
    try:
        tree = ast.parse("\n".join(_stdlib(path)))
    except SyntaxError:
        return []
    nodes = [tree] + [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.ClassDef, ast.AsyncFunctionDef))]
    return [line for n in nodes for line in (ast.get_docstring(n) or "").splitlines()]


def english_prose() -> List[str]:
    """pydoc's topic help, the Python license and module docstrings: real English with code snippets."""
    try:
        from pydoc_data.topics import topics
        lines = [line for key in sorted(topics) for line in topics[key].splitlines()]
    except ImportError:  # some distributions strip pydoc_data
        lines = []
    lines += _stdlib("LICENSE.txt") + [line for path in DOC_FILES for line in _docstrings(path)]
    return [line for line in lines if line.strip()]


def source_code() -> List[str]:
    return [line for path in CODE_FILES for line in _stdlib(path) if line.strip()]


def _chars(*ranges) -> List[str]:
    return [chr(c) for lo, hi in ranges for c in range(lo, hi + 1)]


def _words(rng: random.Random, alphabet: List[str], n: int, lo: int = 1, hi: int = 10) -> List[str]:
    return ["".join(rng.choice(alphabet) for _ in range(rng.randint(lo, hi))) for _ in range(n)]


def accented_latin(rng: random.Random) -> List[str]:
    french = list("abcdefghijklmnopqrstuvwxyzàâçéèêëîïôûùüÿœæ") + list("ÀÂÇÉÈÊËÎÏÔÛÙÜŸŒÆ")
    german = list("abcdefghijklmnopqrstuvwxyzäöüßẞÄÖÜ")
    viet = list("abcdeghiklmnopqrstuvxyđĐ") + _chars((0x1EA0, 0x1EF9)) + list("ăâêôơưĂÂÊÔƠƯ")
    other = _chars((0xC0, 0xFF), (0x100, 0x24F), (0x1E00, 0x1E9F)) + list("ĳŉǅǈǋǲﬁﬂﬃﬅﬆİıſ")
    lines = []
    for alphabet in (french, german, viet, other):
        for _ in range(600):
            words = _words(rng, alphabet, rng.randint(3, 14), 1, 12)
            line = " ".join(w.capitalize() if rng.random() < 0.2 else w for w in words)
            form = rng.choice(("NFC", "NFD", "NFKC", None))  # decomposed text exercises accent stripping
            lines.append(unicodedata.normalize(form, line) if form else line)
    return lines


def greek_cyrillic_rtl_indic(rng: random.Random) -> List[str]:
    scripts = [
        _chars((0x391, 0x3A9), (0x3B1, 0x3C9), (0x386, 0x38F), (0x1F00, 0x1FFC)),  # Greek incl. polytonic
        _chars((0x400, 0x4FF)),  # Cyrillic
        _chars((0x5D0, 0x5EA), (0x591, 0x5C7)),  # Hebrew with points (Mn)
        _chars((0x621, 0x64A), (0x64B, 0x65F), (0x660, 0x669)),  # Arabic with harakat
        _chars((0x900, 0x97F)),  # Devanagari (Mn, Mc, Lo)
        _chars((0xE01, 0xE5B)),  # Thai
    ]
    lines = []
    for alphabet in scripts:
        for _ in range(300):
            lines.append(" ".join(_words(rng, alphabet, rng.randint(3, 12), 1, 9)))
    sigma = ["ΟΔΟΣ", "ΑΣ.", "ΣΑΣ ΣΟΦΟΣ", "Σ", "ΑΣ'Β", "λόγοΣ", "ὈΔΥΣΣΕΥΣ"]
    lines += [" ".join(rng.choice(sigma) for _ in range(6)) for _ in range(100)]
    return lines


def cjk_kana_hangul(rng: random.Random) -> List[str]:
    han = _chars((0x4E00, 0x9FFF), (0x3400, 0x4DBF), (0xF900, 0xFAFF))
    rare_han = _chars((0x20000, 0x2A6DF), (0x2A700, 0x2B81F), (0x2B820, 0x2B92F), (0x2CEA0, 0x2CEAF),
                      (0x2F800, 0x2FA1F), (0x30000, 0x3134A))
    kana = _chars((0x3041, 0x3096), (0x30A1, 0x30FA), (0xFF66, 0xFF9D))
    hangul = _chars((0xAC00, 0xD7A3)) + _chars((0x1100, 0x11FF))
    punct = list("。、，「」『』（）！？：；・ー〜…　")
    lines = []
    for _ in range(1500):
        pool = rng.choice((han, han, kana, hangul, han + kana))
        n = rng.randint(5, 60)
        line = "".join(rng.choice(pool) if rng.random() > 0.1 else rng.choice(punct) for _ in range(n))
        if rng.random() < 0.3:
            line += " " + " ".join(_words(rng, list("abcxyz"), 3))
        lines.append(line)
    for _ in range(300):
        lines.append("".join(rng.choice(rare_han + han) for _ in range(rng.randint(3, 20))))
    lines += [" ".join(_words(rng, hangul, 8, 1, 5)) for _ in range(300)]
    return lines


def emoji(rng: random.Random) -> List[str]:
    base = _chars((0x1F300, 0x1F5FF), (0x1F600, 0x1F64F), (0x1F680, 0x1F6FF), (0x1F900, 0x1F9FF),
                  (0x2600, 0x27BF))
    zwj = ["👨\u200d👩\u200d👧\u200d👦", "🏳️\u200d🌈", "👩🏽\u200d💻", "🧑\u200d🤝\u200d🧑", "❤️\u200d🔥"]
    flags = ["🇫🇷", "🇯🇵", "🇺🇸", "🏴\U000E0067\U000E0062\U000E0065\U000E006E\U000E0067\U000E007F"]
    extras = ["1\ufe0f\u20e3", "👍🏿", "✌︎", "☺️", "#\u20e3"]
    lines = []
    for _ in range(800):
        parts = []
        for _ in range(rng.randint(3, 12)):
            r = rng.random()
            parts.append(rng.choice(base) if r < 0.5 else rng.choice(zwj + flags + extras) if r < 0.8 else
                         rng.choice(["great", "ok", "lol", "Paris", "café"]))
        lines.append(("" if rng.random() < 0.5 else " ").join(parts))
    return lines


def combining(rng: random.Random) -> List[str]:
    marks = _chars((0x300, 0x36F), (0x1AB0, 0x1ABE), (0x1DC0, 0x1DFF), (0x20D0, 0x20F0), (0xFE20, 0xFE2F))
    # every character with a non-zero combining class (any category), to exercise canonical ordering
    nonstarters = [chr(c) for c in range(0x110000) if not 0xD800 <= c <= 0xDFFF and unicodedata.combining(chr(c))]
    bases = list("aeiouAEIOUnNcCsSzZ") + _chars((0x391, 0x3A9), (0x410, 0x42F))
    lines = []
    for _ in range(1500):
        words = []
        for _ in range(rng.randint(2, 8)):
            w = ""
            for _ in range(rng.randint(1, 6)):
                pool = marks if rng.random() < 0.7 else nonstarters
                w += rng.choice(bases) + "".join(rng.choice(pool) for _ in range(rng.randint(0, 4)))
            words.append(w)
        lines.append(" ".join(words))
    return lines


def controls_and_whitespace(rng: random.Random) -> List[str]:
    odd = (_chars((0x00, 0x1F), (0x7F, 0x9F)) +
           list("\u00ad\u061c\u180e\u200b\u200c\u200d\u200e\u200f\u202a\u202e\u2060\u2061\u2066\u2069"
                "\ufeff\ufff9\ufffb\ufffc\ufffd\U0001d173\U000e0001\U000e0020") +
           list("\ue000\uf8ff\U000f0000\U0010fffd\u0378\u0379\ufdd0\uffff\U0001fffe\U000e0080"))
    spaces = list(" \t\n\r\x0b\x0c\x1c\x1d\x1e\x1f\x85\xa0\u1680\u2000\u2001\u2002\u2003\u2007\u2009\u200a"
                  "\u2028\u2029\u202f\u205f\u3000")
    words = ["hello", "World", "naïve", "東京", "a.b", "don't", "x", "ÉCOLE"]
    lines = []
    for _ in range(2500):
        out = []
        for _ in range(rng.randint(2, 20)):
            r = rng.random()
            out.append(rng.choice(odd) if r < 0.35 else rng.choice(spaces) if r < 0.6 else rng.choice(words))
        lines.append("".join(out))
    return lines


@functools.lru_cache(maxsize=None)
def _by_category() -> Dict[str, List[int]]:
    cats: Dict[str, List[int]] = {}
    for cp in range(0x110000):
        if not 0xD800 <= cp <= 0xDFFF:
            cats.setdefault(unicodedata.category(chr(cp)), []).append(cp)
    return cats


def every_category(rng: random.Random) -> List[str]:
    """For each general category: lines of its characters alone, mixed with letters, and as words."""
    lines = []
    for cat, cps in sorted(_by_category().items()):
        for _ in range(120):
            chars = [chr(rng.choice(cps)) for _ in range(rng.randint(1, 12))]
            style = rng.randrange(3)
            if style == 0:
                lines.append("".join(chars))
            elif style == 1:
                lines.append("".join("ab"[rng.randrange(2)] + c for c in chars) + " end")
            else:
                lines.append(" ".join(c + rng.choice(["x", "Y", "é", "7", "!", ""]) for c in chars))
    mixed = [cp for cps in _by_category().values() for cp in cps]
    for _ in range(1500):
        lines.append("".join(chr(rng.choice(mixed)) if rng.random() < 0.5 else rng.choice("aB .,-")
                             for _ in range(rng.randint(1, 40))))
    return lines


def long_words(rng: random.Random) -> List[str]:
    lines = []
    for n in (99, 100, 101, 150, 199, 200, 201, 250, 1000):
        for alphabet in ("abcdefghij", "x", "été", "日本", "a\u0301"):
            word = (alphabet * n)[:n]
            lines.append(f"short {word} tail")
            lines.append(word + "!" + word.upper())
    lines += ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(90, 260)))
              for _ in range(200)]
    lines.append("supercalifragilisticexpialidocious " * 50)
    return lines


def special_tokens(rng: random.Random) -> List[str]:
    fixed = ["[CLS] hello [SEP]", "[CLS]hello[SEP]world[SEP]", "a[CLS]b", "[MASK]", "[cls] [Cls]", "[[CLS]]",
             "[CLS\x00]", "[CL\u200bS]", "[UNK][UNK]", "[PAD] [PAD]", "x [SEP] y [MASK] z", "[ CLS ]",
             "[CLS", "CLS]", "[SEP]。[SEP]", "ÉCOLE[MASK]été", "\u200b[CLS]\u200b", "[MASK]s", "[MASKS]"]
    lines = list(fixed)
    specials = ["[CLS]", "[SEP]", "[MASK]", "[UNK]", "[PAD]", "[cls]", "[", "]"]
    for _ in range(500):
        parts = [rng.choice(specials) if rng.random() < 0.4 else rng.choice(["the", "Cat", "é", "猫", " ", "!"])
                 for _ in range(rng.randint(2, 12))]
        lines.append(("" if rng.random() < 0.5 else " ").join(parts))
    return lines


def corpus(seed: int = 0) -> Dict[str, List[str]]:
    return _corpus(seed)


@functools.lru_cache(maxsize=None)
def _corpus(seed: int) -> Dict[str, List[str]]:
    rng = random.Random(seed)
    sections = {"prose": english_prose(), "code": source_code()}
    for build in (accented_latin, greek_cyrillic_rtl_indic, cjk_kana_hangul, emoji, combining,
                  controls_and_whitespace, every_category, long_words, special_tokens):
        sections[build.__name__] = build(rng)
    return sections


def all_lines(seed: int = 0) -> List[str]:
    return [line for lines in corpus(seed).values() for line in lines]


if __name__ == "__main__":
    total_words = total_bytes = 0
    for name, lines in corpus().items():
        words = sum(len(line.split()) for line in lines)
        size = sum(len(line.encode("utf-8", "surrogatepass")) + 1 for line in lines)
        total_words += words
        total_bytes += size
        print(f"{name:26s} {len(lines):7d} lines {words:8d} words {size / 1e6:6.2f} MB")
    print(f"{'total':26s} {'':13s} {total_words:8d} words {total_bytes / 1e6:6.2f} MB", file=sys.stdout)
