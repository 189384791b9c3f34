"""A CLIP tokenizer vocabulary written offline (no Hub): the byte-level BPE alphabet plus one merge chain per word.

`CLIPTokenizer.from_pretrained(write_clip_vocab(folder, words))` then tokenizes each listed word as ONE token
(`word</w>`) and anything else byte by byte, so a small text encoder can be built for a closed set of captions.
"""

import json
import re
from pathlib import Path
from typing import Iterable

from .atomic import PathLike, atomic_write_text

SPECIAL_TOKENS = ("<|startoftext|>", "<|endoftext|>")


def bytes_to_unicode() -> dict:
    """GPT-2/CLIP's byte -> printable character table (the byte-level BPE alphabet)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    codes, extra = list(printable), 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            codes.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, codes)))


def write_clip_vocab(folder: PathLike, words: Iterable[str]) -> Path:
    """Write vocab.json (byte alphabet, its end-of-word forms, one merge chain per word, the two specials) and
    merges.txt into `folder`; `words` are lower-case, without spaces (CLIP's pre-tokenizer splits on them)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    alphabet = list(bytes_to_unicode().values())
    vocab = {token: index for index, token in enumerate(alphabet + [c + "</w>" for c in alphabet])}
    merges = []
    for word in words:
        if not word or word != word.lower() or any(c.isspace() for c in word):
            raise ValueError(f"vocabulary word {word!r} must be non-empty, lower-case and without spaces: split it into words.")
        pieces = list(word[:-1]) + [word[-1] + "</w>"]
        while len(pieces) > 1:
            merges.append(f"{pieces[0]} {pieces[1]}")
            pieces = [pieces[0] + pieces[1]] + pieces[2:]
            vocab.setdefault(pieces[0], len(vocab))
    merges = list(dict.fromkeys(merges))
    for special in SPECIAL_TOKENS:
        vocab[special] = len(vocab)
    atomic_write_text(folder / "vocab.json", json.dumps(vocab))
    atomic_write_text(folder / "merges.txt", "\n".join(["#version: 0.2", *merges]) + "\n")
    return folder


def caption_words(captions: Iterable[str]) -> list:
    """The distinct words CLIP's pre-tokenizer splits ASCII `captions` into (letter runs, single digits, other symbol
    runs), lower-cased, in order of first appearance: the `words` that make each caption a few whole tokens."""
    words = (word for caption in captions for word in re.findall(r"[a-z]+|[0-9]|[^\sa-z0-9]+", caption.lower()))
    return list(dict.fromkeys(words))
