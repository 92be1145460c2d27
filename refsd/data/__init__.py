"""Data files shipped with refsd: CLIP's BPE merges (``bpe_simple_vocab_16e6.txt.gz``,
MIT, see ``bpe_simple_vocab_16e6.LICENSE.txt``) and the derivation of the
Hugging Face ``vocab.json`` / ``merges.txt`` from it, exactly as CLIP's
``SimpleTokenizer`` builds its encoder:

* merges: lines 1 .. 49152 - 256 - 2 of the file (line 0 is a version header),
* vocab: the 256 byte-level unicode symbols, the same with ``</w>``, one entry
  per merge (the pair joined), then ``<|startoftext|>`` and ``<|endoftext|>``:
  256 + 256 + 48894 + 2 = 49408 ids.
"""

from __future__ import annotations

import functools
import gzip
from pathlib import Path

DATA_DIR = Path(__file__).resolve().parent
BPE_PATH = DATA_DIR / "bpe_simple_vocab_16e6.txt.gz"
BOS, EOS = "<|startoftext|>", "<|endoftext|>"
VOCAB_SIZE = 49408


def bytes_to_unicode() -> dict[int, str]:
    """CLIP's (and GPT-2's) reversible byte -> printable unicode map."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


@functools.lru_cache(maxsize=1)
def clip_bpe() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """(vocab: token -> id, merges: ordered pairs) of the CLIP tokenizer."""
    lines = gzip.decompress(BPE_PATH.read_bytes()).decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1 : 49152 - 256 - 2 + 1]]
    symbols = list(bytes_to_unicode().values())
    vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges] + [BOS, EOS]
    if len(vocab) != VOCAB_SIZE or len(set(vocab)) != VOCAB_SIZE:
        raise RuntimeError(f"{BPE_PATH}: derived {len(vocab)} tokens ({len(set(vocab))} distinct), "
                           f"expected {VOCAB_SIZE}")
    return {tok: i for i, tok in enumerate(vocab)}, merges


def merges_txt() -> str:
    """``merges.txt`` as Hugging Face ships it for CLIP (version header, one pair per line)."""
    _, merges = clip_bpe()
    return "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges)
