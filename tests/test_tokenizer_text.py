"""The diverse text the tokenizer tests compare against the reference: shipped samples (tests/data/tokenizer:
English prose, code in ten languages, thirty scripts), escaped edge cases (invisible characters, emoji
sequences, whitespace of every kind, special tokens), and a seeded random mix of all of them with numbers,
dates, contractions and whitespace runs, up to more than 200 KB. build_documents() is deterministic."""
from __future__ import annotations

import random
import unicodedata
from pathlib import Path

DATA = Path(__file__).resolve().parent / "data" / "tokenizer"
TARGET_BYTES = 220_000

EDGE = [
    # zero-width and invisible characters, bidi controls, soft hyphen, BOM, word joiner, variation selectors
    "zero\u200bwidth\u200b space, non\u200cjoiner, joiner\u200d, word\u2060joiner, soft\u00adhyphen, \ufeffBOM",
    "bidi: \u200eLRM\u200f RLM \u202aLRE\u202c \u202eRLO reversed\u202c \u2066isolate\u2069 \u061c ALM",
    "variation selectors: \u2764\ufe0f \u2764\ufe0e \u263a\ufe0f; tag chars \U000e0041\U000e0042; "
    "private \ue000\U000f0000",
    # combining marks: precomposed vs decomposed, stacked marks, Zalgo, Hangul jamo composition
    "caf\u00e9 vs cafe\u0301, n\u0303, A\u030a vs \u00c5, \u1e9b\u0323, stacked a\u0300\u0301\u0302\u0303\u0304",
    "Z\u0351\u036b\u0343a\u0352\u0300l\u0346\u0368g\u0344o\u0358 t\u035be\u0301x\u0300t "
    "\u0e01\u0e34\u0e4a \u1100\u1161\u11a8",
    # emoji: ZWJ families, skin tones, flags (regional indicators), subdivision flag, keycaps, single code points
    "family \U0001F468\u200d\U0001F469\u200d\U0001F467\u200d\U0001F466 "
    "couple \U0001F469\u200d\u2764\ufe0f\u200d\U0001F468",
    "skin tones \U0001F44B\U0001F3FB\U0001F44B\U0001F3FC\U0001F44B\U0001F3FD\U0001F44B\U0001F3FE\U0001F44B\U0001F3FF "
    "\U0001F9D1\U0001F3FD\u200d\U0001F4BB technologist",
    "flags \U0001F1FA\U0001F1F8\U0001F1EF\U0001F1F5\U0001F1E9\U0001F1EA\U0001F1EB\U0001F1F7 \U0001F3F4\U000E0067"
    "\U000E0062\U000E0073\U000E0063\U000E0074\U000E007F \U0001F3F3\ufe0f\u200d\U0001F308 rainbow",
    "keycaps 1\ufe0f\u20e3 #\ufe0f\u20e3 *\ufe0f\u20e3 and \U0001F600\U0001F680\U0001F4A9\U0001F937\u200d\u2642\ufe0f "
    "\U0001FAE0 melting \U0001FAF8 (newer emoji)",
    # whitespace of every kind: Unicode spaces, line/paragraph separators, NEL, vertical tab, form feed,
    # and the C0 separators \x1c-\x1f that Python's str.isspace() calls spaces but \s does not
    "spaces:\u00a0nbsp\u2000en quad\u2001em quad\u2002\u2003\u2004\u2005\u2006\u2007\u2008\u2009thin\u200ahair"
    "\u202fnnbsp\u205fmmsp\u3000ideographic\u1680ogham",
    "lines:\u2028LS\u2029PS\u0085NEL\x0bVT\x0cFF\x1cFS\x1dGS\x1eRS\x1fUS\x7fDEL\x01SOH\x1bESC[0m",
    "mixed runs \t \t\t  \n \r\n\r\n \u00a0 \u3000\u3000 \n\t\n \x0b\x0c x \x1c \x1f y  \u2028  z",
    "  leading and trailing  ", "\n\n\nleading newlines", "trailing newlines\n\n\n", "\t\ttabs\t\t",
    "CRLF line one\r\nCRLF line two\r\n\r\nafter blank\r\n", "only\rcarriage\rreturns\r", " ", "\n", "\r\n",
    # special tokens: alone, inside words, adjacent, near misses
    "<|endoftext|>", "a<|endoftext|>b", "<|endoftext|><|endoftext|>", " <|endoftext|> ", "\n<|endoftext|>\n",
    "doc one.<|endoftext|>Doc two!<|endoftext|>", "<|endoftext|", "|endoftext|>", "<<|endoftext|>>",
    "<|endoftext |>", "<|ENDOFTEXT|>", "<|endoftext|>'s", "x<|endoftext|>123",
    # numbers and letters of every kind: Nl roman numerals, No fractions/superscripts, fullwidth, other digits
    "numbers \u2160\u2161\u2162 \u216b \u00bd\u00bc\u2153 x\u00b2 y\u2074 \u2460\u2461 \uff11\uff12\uff13 "
    "\u0661\u0662\u0663 \u0967\u0968 \u0e51\u0e52 \U0001D7CE\U0001D7CF \U0001F100 \u3007\u4e00",
    "letters \u02b0\u02b1 \u0294 \u01c5 \u1d2c \u2c00 \U00010400 \U0001D400\U0001D41A \U0001E900 \u3041\u30a1 \ua000",
    "newer Unicode: \U0001CCF0\U0001CCF1 outlined digits (16.0), \U0002EBF0\U0002EBF1 CJK Ext I (15.1), "
    "\U00031350 Ext H, \U00011F04 Kawi, \U0001E4D0 Nag Mundari, \U00010D4A Garay, \u0c5d",
    "symbols \u2200x\u2208\u211d: x\u00b2\u2265 0 \u2227 \u00ac\u22a5 \u2192 \u221e \u2211 \u221a \u00b1 "
    "\u2122\u00ae\u00a9 \u20ac\u00a3\u00a5\u20b9\u20bf \u2190\u2191 \u2605\u2606 \u266a\u266b \u2318 \u238b",
    "box \u250c\u2500\u2500\u2510\n\u2502ok\u2502\n\u2514\u2500\u2500\u2518 braille \u2801\u2803 math "
    "\U0001D4D0\U0001D4EA \U0001D538 \U0001D56C",
    "apostrophes: don\u2019t it\u2019s (curly) vs don't it's; ''s '''s 's' 'S 'Ll 'LL 'lL 'd'm't 're've",
    "'s'tis 'twas'''rock'n'roll' ' s ' t", "I'M YOU'RE WE'VE SHE'LL HE'D IT'S ISN'T AREN'T",
]


def _read(name: str) -> str:
    return (DATA / name).read_text(encoding="utf-8")


def samples() -> dict[str, str]:
    return {name: _read(name) for name in ("prose.txt", "world.txt", "code.txt")}


def _variants(text: str) -> list[str]:
    """The same text with CRLF line ends, tab indentation, trailing spaces and NFD-decomposed accents."""
    lines = text.split("\n")
    return ["\r\n".join(lines), "\n".join("\t" + ln for ln in lines), "\n".join(ln + "  " for ln in lines),
            unicodedata.normalize("NFD", text)]


def _mix(rng: random.Random, words: list[str], lines: list[str]) -> str:
    seps = [" ", " ", " ", "  ", "   ", "\t", "\n", "\r\n", "\n\n", " \n", "\t\n", "\u00a0", "\u3000", "",
            "\u200b", "\u2009", " \t ", "    \n\t", "\x0c", "\u2028"]
    extras = [
        lambda: str(rng.randint(-10**6, 10**12)),
        lambda: f"{rng.random() * 10 ** rng.randint(-3, 9):.{rng.randint(0, 6)}f}",
        lambda: f"{rng.randint(1900, 2100)}-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}",
        lambda: f"{rng.randint(0, 23):02d}:{rng.randint(0, 59):02d}:{rng.randint(0, 59):02d}",
        lambda: rng.choice(["don't", "DON'T", "we'll", "WE'LL", "I'm", "i'M", "they've", "THEY'VE", "she'd",
                            "you're", "YOU'RE", "'s", "'S", "o'clock", "rock'n'roll", "'tis", "ma'am"]),
        lambda: rng.choice(EDGE), lambda: rng.choice(["<|endoftext|>", "\u200d", "\U0001F44D\U0001F3FD", "e\u0301",
                                                      "\U0001F1EB\U0001F1F7", "\ufeff", "\u00ad", "\r"]),
        lambda: " " * rng.randint(1, 40), lambda: "\n" * rng.randint(1, 6), lambda: "\t" * rng.randint(1, 5),
    ]
    parts: list[str] = []
    for _ in range(rng.randint(40, 160)):
        r = rng.random()
        if r < 0.55:
            parts.append(rng.choice(words))
        elif r < 0.75:
            parts.append(rng.choice(lines))
        else:
            parts.append(rng.choice(extras)())
        parts.append(rng.choice(seps))
    if rng.random() < 0.3:
        parts.insert(0, rng.choice(seps) * rng.randint(1, 3))
    return "".join(parts)


def build_documents(target_bytes: int = TARGET_BYTES, seed: int = 1234) -> list[str]:
    """Deterministic list of documents whose total UTF-8 size is at least target_bytes."""
    docs = list(samples().values())
    for text in list(docs):
        docs += _variants(text)
    docs += EDGE
    words = [w for d in samples().values() for w in d.split()]
    lines = [ln for d in samples().values() for ln in d.split("\n") if ln.strip()] + EDGE
    rng = random.Random(seed)
    while sum(len(d.encode()) for d in docs) < target_bytes:
        docs.append(_mix(rng, words, lines))
    return docs


def test_documents_are_big_and_diverse() -> None:
    docs = build_documents()
    text = "".join(docs)
    assert len(text.encode()) >= 200_000
    assert build_documents() == docs  # deterministic
    scripts = {"LATIN", "GREEK", "CYRILLIC", "ARABIC", "HEBREW", "DEVANAGARI", "CJK", "HANGUL", "HIRAGANA",
               "THAI", "GEORGIAN", "ARMENIAN", "BENGALI", "TAMIL", "ETHIOPIC"}
    seen = {unicodedata.name(c, "?").split()[0] for c in set(text)}
    assert scripts <= seen, scripts - seen
    for needle in ("\r\n", "\u200d", "\U0001F1FA\U0001F1F8", "\u0301", "\u200b", "<|endoftext|>", "DON'T", "\t\t",
                   "\u3000", "\x1c", "\U0002EBF0", "def ", "fn ", "func ", "SELECT", "#include"):
        assert needle in text, repr(needle)
