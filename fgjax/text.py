"""Text input of PMA: noun phrases, the vocabulary and fixed-shape phrase arrays (host side).

PMA (Song et al., IEEE TIP 2020; spec section 7) reads a sentence about the image, e.g. "this
bird has a black crown as well as a small black bill", as a set of noun phrases ("bird",
"a black crown", "a small black bill"), each embedded by a word embedding + LSTM. The paper gets
its phrases by tokenization, part-of-speech tagging and noun-phrase chunking (NLTK-style in the
original). Taggers and chunkers of that kind fetch trained models at run time, which cannot work
on machines without network access (nor on many clusters), and a model's version changes its
output. This module uses a small deterministic rule-based chunker instead, written for the
descriptions of birds and cars (the CUB captions of Reed et al. 2016: lowercase, informal, often
without a final period); it is pure Python + numpy and downloads nothing.

- `tokenize(text)`: lowercase word tokens; hyphenated words ("orange-red", "medium-sized") are
  one token, punctuation is dropped, a possessive "'s" is dropped ("bird's" -> "bird"),
  contractions of closed-class words stay whole ("it's", "doesn't").
- `noun_phrases(sentence)`: the chunker. A phrase is an optional determiner (the articles
  a/an/the and quantifiers such as "no" or "several" stay; demonstratives this/that/these/those
  and possessives its/their drop) + numbers + adjectives (adjectives joined by "and"/"or"/a comma
  stay together: "black and white wings") + one or more nouns (noun compounds: "wing bars",
  "tail feathers"). Words outside the closed classes and the adjective lexicon are nouns;
  unknown words ending in -ish, -y, -ed, -ing, -ful, -ous, -ive are adjectives. A phrase never
  spans two nouns joined by "and" or a comma ("a white belly and breast" -> "a white belly",
  "breast"); adjectives without a noun ("wings that are black": "black") make no phrase.
- `sentences(content)`: the non-empty stripped lines of a description file (CUB's `text_c10`
  files hold one sentence a line).
- `Vocabulary`: the words of the training phrases, ids 0 = `<pad>`, 1 = `<unk>`, saved in the
  workdir (one word a line) so that eval, predict and a resumed run see the same ids.
- `TextEncoder`: one example's text (None, one sentence or several) -> `phrases` int32
  (max_phrases, max_words) + `phrase_mask` bool (max_phrases,), so that batches keep one shape.

docs/text.md describes the rules and the options.
"""
from __future__ import annotations

import hashlib
import os
import re
from collections import Counter
from typing import Iterable, Sequence

import numpy as np

PAD, UNK = "<pad>", "<unk>"
PAD_ID, UNK_ID = 0, 1
TRAIN_MODES = ("sample", "concat")
EVAL_MODES = ("all", "first")

# ---------------------------------------------------------------------------------------------
# Lexicons (closed classes, adjectives, nouns the suffix rules would get wrong).
# ---------------------------------------------------------------------------------------------

_ARTICLES = {"a", "an", "the"}
# Determiners that stay in the phrase (they carry meaning: "no wing bars", "several spots").
_KEPT_DETERMINERS = _ARTICLES | {
    "no", "some", "any", "each", "every", "both", "several", "many", "few", "another", "either",
    "neither", "various", "multiple", "numerous"}
# Determiners that drop: demonstratives and possessives ("this bird" -> "bird").
_DROPPED_DETERMINERS = {
    "this", "that", "these", "those", "its", "their", "his", "her", "hers", "our", "your", "my",
    "whose"}
_NUMBERS = {
    "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven",
    "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen",
    "twenty", "thirty", "forty", "fifty", "hundred", "dozen", "couple", "pair"}
# Copulas and verbs after which a bare adjective is a predicate ("wings that are black").
_COPULAS = {
    "is", "are", "was", "were", "be", "been", "being", "am", "isn't", "aren't", "wasn't",
    "weren't", "looks", "look", "looking", "appears", "appear", "seems", "seem", "becomes",
    "become", "remains", "remain", "stays", "it's", "that's", "there's", "what's", "turns",
    "turn", "gets", "get", "goes"}
_CONJUNCTIONS = {"and", "or"}  # may join adjectives inside a phrase
_PREPOSITIONS = {
    "with", "without", "of", "on", "in", "at", "to", "from", "by", "for", "near", "around",
    "along", "across", "over", "under", "above", "below", "behind", "between", "into", "onto",
    "through", "throughout", "toward", "towards", "about", "like", "unlike", "than", "as", "atop",
    "beneath", "underneath", "upon", "within", "against", "among", "beside", "besides", "except",
    "via", "per", "up", "down", "off", "out", "inside", "outside", "past", "until", "till",
    "beyond", "amid", "alongside", "including", "plus", "versus", "vs"}
_PRONOUNS = {
    "it", "they", "them", "he", "she", "him", "we", "you", "i", "me", "us", "which", "who", "whom",
    "what", "where", "when", "there", "here", "itself", "themselves", "theirs", "ours",
    "something", "anything", "everything", "nothing", "someone", "everyone", "whatever",
    "whichever", "how", "why"}
_OTHER_CONJUNCTIONS = {
    "but", "nor", "yet", "so", "while", "whereas", "although", "though", "because", "if",
    "unless", "since", "then", "thus", "hence", "therefore", "however", "whether"}
# Verbs and auxiliaries common in descriptions (the -ed/-ing forms are covered by the suffix rule).
_VERBS = {
    "has", "have", "had", "having", "hasn't", "haven't", "does", "do", "did", "doesn't", "don't",
    "didn't", "can", "could", "may", "might", "will", "would", "shall", "should", "must", "can't",
    "cannot", "won't", "features", "feature", "contains", "contain", "includes", "include",
    "possesses", "possess", "displays", "display", "shows", "show", "showing", "bears", "bear",
    "carries", "carry", "extends", "extend", "covers", "cover", "blends", "blend", "fades",
    "fade", "contrasts", "contrast", "runs", "run", "matches", "match", "surrounds", "surround",
    "makes", "make", "made", "gives", "give", "stands", "stand", "sits", "sit", "perches",
    "perch", "flies", "fly", "eats", "eat", "lives", "live", "sings", "sing", "walks", "walk",
    "swims", "swim", "reaches", "reach", "connects", "connect", "meets", "meet", "continues",
    "continue", "starts", "start", "begins", "begin", "stretches", "stretch", "tapers", "taper",
    "curves", "points", "sticks", "leads", "lead", "comes", "come", "go", "hangs", "hang",
    "holds", "hold", "rests", "wraps", "wrap", "circles", "encircles", "encircle",
    "outlines", "outline", "spread", "spreads", "grown", "seen", "see", "sees", "drives",
    "resembles", "resemble", "transitions", "ends", "changes", "change", "mixes", "says", "say"}
# Adverbs and other words that end a phrase.
_BREAK_WORDS = {
    "not", "also", "too", "just", "only", "even", "well", "overall", "else", "instead", "yes",
    "probably", "maybe", "perhaps", "still", "already", "again", "ever",
    "never", "always", "often", "sometimes", "usually", "otherwise", "altogether", "please",
    "etc", "ie", "eg", "aka", "respectively", "downward", "downwards", "upward", "upwards",
    "forward", "forwards", "backward", "backwards", "outward", "outwards", "inward", "inwards",
    "sideways", "together", "apart", "away"}
# Adverbs of degree that modify the adjectives of a phrase ("a very long bill").
_MODIFIERS = {
    "very", "rather", "quite", "fairly", "somewhat", "pretty", "really", "extremely", "mostly",
    "mainly", "almost", "nearly", "all", "more", "most", "less", "least", "slightly", "partly",
    "partially", "entirely", "completely", "predominantly", "primarily", "largely", "super",
    "much"}
_COLOURS = {
    "black", "white", "grey", "gray", "brown", "red", "orange", "yellow", "green", "blue",
    "purple", "pink", "tan", "buff", "beige", "cream", "olive", "gold", "golden", "silver",
    "chestnut", "rust", "rufous", "maroon", "crimson", "scarlet", "teal", "turquoise", "cyan",
    "magenta", "violet", "indigo", "ivory", "khaki", "charcoal", "slate", "sage", "mauve", "lime",
    "navy", "bronze", "copper", "ochre", "ocher", "amber", "lavender", "lilac", "burgundy",
    "azure", "aqua", "emerald", "ruby", "sapphire", "cinnamon", "chocolate", "coffee", "sandy",
    "fawn", "taupe", "umber", "sepia", "auburn", "vermilion", "cerulean", "cobalt", "chrome",
    "multicolored", "multicoloured", "colorful", "colourful", "iridescent", "metallic", "neon",
    "dark", "light", "pale", "bright", "deep", "dull", "vibrant", "vivid", "bold", "faint",
    "rich", "muted", "pastel", "dusky", "drab", "off", "brilliant", "glossy", "shiny", "matte",
    "translucent", "transparent"}
_ADJECTIVES = _COLOURS | {
    "small", "large", "big", "little", "tiny", "huge", "giant", "medium", "long", "short", "tall",
    "thin", "thick", "slender", "narrow", "wide", "broad", "round", "flat", "sharp", "pointed",
    "curved", "hooked", "stout", "stubby", "blunt", "straight", "fat", "plump", "skinny", "chubby",
    "fluffy", "distinct", "distinctive", "prominent", "noticeable", "visible", "conspicuous",
    "solid", "mixed", "other", "same", "different", "entire", "whole", "full", "upper", "lower",
    "inner", "outer", "mid", "central", "lateral", "dorsal", "ventral", "frontal", "facial",
    "rear", "left", "right", "main", "primary", "secondary", "plain", "simple", "uniform",
    "average", "normal", "typical", "common", "unique", "unusual", "strange",
    "beautiful", "pretty", "cute", "nice", "handsome", "elegant", "majestic", "delicate",
    "strong", "powerful", "heavy", "light-weight", "lightweight", "sturdy", "smooth", "rough",
    "soft", "hard", "fine", "coarse", "sleek", "compact", "slim", "petite", "miniature",
    "oversized", "massive", "enormous", "stocky", "lean", "wild", "young", "adult", "juvenile",
    "male", "female", "mature", "immature", "new", "old", "vintage", "classic", "modern",
    "antique", "retro", "sporty", "luxurious", "fast", "electric", "hybrid", "open", "closed",
    "oval", "square", "rectangular", "triangular", "circular", "conical", "cylindrical",
    "angular", "tapered", "forked", "notched", "webbed", "speckled", "spotted", "striped",
    "streaked", "mottled", "barred", "dotted", "patterned", "checkered", "scaly", "spiky",
    "tufted", "crested", "feathered", "bare", "naked", "ringed", "black-and-white", "extra",
    "first", "second", "third", "fourth", "fifth", "last", "final", "next", "single",
    "double", "twin", "paired", "particular", "certain", "proportionate",
    "short-ish", "longish", "vertical", "horizontal", "diagonal", "parallel", "opposite",
    "darker", "lighter", "paler", "brighter", "longer", "shorter", "smaller", "larger", "bigger",
    "thicker", "thinner", "wider", "broader", "deeper", "duller", "taller", "darkest",
    "lightest", "palest", "brightest", "longest", "shortest", "smallest", "largest", "biggest",
    "thickest", "thinnest", "widest", "same-colored", "wet", "dry", "hot", "cool", "sleepy"}
# Nouns that the suffix rules would take for adjectives (-y, -ed, -ing, -ish, -ive, -ous, -ful).
_NOUNS = {
    "wing", "underwing", "ring", "eyering", "eye-ring", "head", "forehead", "redhead",
    "body", "belly", "underbelly", "tummy", "superciliary", "supercilium", "bunting", "starling",
    "duckling", "gosling", "nestling", "fledgling", "sibling", "waxwing", "lapwing", "redwing",
    "king", "kingfisher", "thing", "string", "swing", "sting", "spring", "ceiling", "building",
    "coloring", "colouring", "marking", "patterning", "banding", "striping", "feathering",
    "edging", "lining", "molding", "moulding", "siding", "railing", "awning", "morning",
    "evening", "earring", "ending", "opening", "housing", "casing", "fitting", "trim", "wiring",
    "seating", "shading", "mottling", "barring", "streaking", "scalloping", "spotting",
    "speed", "breed", "seed", "tweed", "weed", "reed", "bed", "sled", "shed", "steed",
    "family", "utility", "city", "country", "buggy", "lorry", "chevy", "jetty", "canopy",
    "party", "variety", "majority", "army", "baby", "butterfly", "firefly", "dragonfly",
    "lily", "ivy", "berry", "cherry", "sky", "puppy", "ferry", "story", "entry", "battery",
    "factory", "cavity", "quality", "energy", "pony", "body-work", "bodywork", "jeep", "vanity",
    "fish", "kingfish", "goldfish", "dish", "polish", "finish", "radish", "parish", "drive",
    "hive", "dive", "motive", "rest", "rear-end"}
# Multi-word expressions that are not noun phrases: dropped before chunking.
_FIXED_EXPRESSIONS = (
    ("a", "lot", "of"), ("lots", "of"), ("a", "bit", "of"), ("a", "bit"), ("in", "addition", "to"),
    ("in", "addition"), ("kind", "of"), ("sort", "of"), ("in", "color"), ("in", "colour"),
    ("in", "colors"), ("in", "colours"), ("as", "well", "as"), ("such", "as"),
    ("in", "general"), ("for", "the", "most", "part"), ("at", "all"), ("of", "course"),
    ("in", "size"), ("in", "shape"), ("in", "length"))
_FIXED_BY_FIRST: dict[str, list[tuple[str, ...]]] = {}
for _expr in sorted(_FIXED_EXPRESSIONS, key=len, reverse=True):
  _FIXED_BY_FIRST.setdefault(_expr[0], []).append(_expr)
del _expr

# Contractions kept whole by tokenize (closed-class words); other "'s" endings are possessives.
_CONTRACTIONS = {w for w in _COPULAS | _VERBS | _DROPPED_DETERMINERS | _PRONOUNS if "'" in w}

# Word classes of the chunker.
_DET, _NUM, _ADJ, _NOUN, _CONJ, _COMMA, _STOP, _COPULA, _BREAK, _DROP = range(10)

_APOSTROPHES = str.maketrans({"\u2019": "'", "\u2018": "'", "`": "'", "\u00b4": "'",
                              "\u2010": "-", "\u2011": "-"})
# A word (letters/digits, inner hyphens and apostrophes) or one punctuation mark.
_SCAN = re.compile(r"(?P<word>[^\W_]+(?:[-'][^\W_]+)*)|(?P<comma>,)|(?P<join>[&/+])"
                   r"|(?P<stop>[.;:!?()\[\]{}\"\n\r\u2013\u2014\u2026|*])")


def _scan(text: str) -> list[tuple[str, str]]:
  """(kind, token) pairs: kind "word", "poss" (a possessive just ended), "comma", "join"
  (& / +, read as "and" / "or"), "stop" (other punctuation and line breaks)."""
  if not isinstance(text, str):
    raise TypeError(f"text must be a str, got {type(text).__name__}")
  out = []
  for m in _SCAN.finditer(text.translate(_APOSTROPHES).lower()):
    kind = m.lastgroup
    tok = m.group()
    if kind == "word":
      if "'" in tok and tok not in _CONTRACTIONS:
        possessive = tok.endswith("'s")
        tok = tok[:-2] if possessive else tok
        tok = tok.replace("'", "")
        if tok:
          out.append(("word", tok))
        if possessive:
          out.append(("poss", "'s"))
        continue
      out.append(("word", tok))
    elif kind == "join":
      out.append(("join", "and" if tok in "&+" else "or"))
    else:
      out.append((kind, tok))
  return out


def tokenize(text: str) -> list[str]:
  """Lowercase word tokens of `text`: hyphenated words stay whole, punctuation is dropped, a
  possessive "'s" is dropped; contractions of closed-class words ("it's") stay whole."""
  return [tok for kind, tok in _scan(text) if kind == "word"]


def sentences(text: str) -> list[str]:
  """The non-empty stripped lines of a description file's content (one sentence a line)."""
  if text is None:
    return []
  return [line.strip() for line in str(text).splitlines() if line.strip()]


def _suffix_adjective(word: str) -> bool:
  """Whether an unknown word looks like an adjective by its ending."""
  if word in _NOUNS or word.endswith(("wing", "ling", "fish", "eed")):
    return False
  n = len(word)
  if word.endswith("y"):  # fluffy, pointy, mostly; vowel + y (jay, grey, key) are not
    return n >= 4 and word[-2] not in "aeiouy"
  if word.endswith(("ed", "ing")):
    return n >= 5
  if word.endswith("ish"):
    return n >= 6
  if word.endswith(("ful", "ous")):
    return n >= 6
  if word.endswith("ive"):
    return n >= 7
  return False


def _word_class(word: str) -> int:
  if word in _KEPT_DETERMINERS:
    return _DET
  if word in _DROPPED_DETERMINERS:
    return _DROP
  if word in _NUMBERS or word.isdigit():
    return _NUM
  if word in _CONJUNCTIONS:
    return _CONJ
  if word in _COPULAS:
    return _COPULA
  if word in _MODIFIERS or word in _ADJECTIVES:
    return _ADJ
  if (word in _PREPOSITIONS or word in _PRONOUNS or word in _OTHER_CONJUNCTIONS
      or word in _VERBS or word in _BREAK_WORDS):
    return _BREAK
  if word in _NOUNS:
    return _NOUN
  if "-" in word:  # a compound: a noun if its last part is one, else adjective if a part is
    parts = [p for p in word.split("-") if p]
    last = parts[-1] if parts else word
    if last in _NOUNS:
      return _NOUN
    if any(p in _ADJECTIVES or p in _MODIFIERS or p in _NUMBERS or p.isdigit()
           or _suffix_adjective(p) or p.endswith("like") for p in parts):
      return _ADJ
    return _NOUN
  if _suffix_adjective(word):
    return _ADJ
  return _NOUN  # open class: anything else is a noun


def _drop_fixed_expressions(items: list[tuple[str, str]]) -> list[tuple[str, str]]:
  out, i = [], 0
  while i < len(items):
    kind, tok = items[i]
    if kind == "word" and tok in _FIXED_BY_FIRST:
      for expr in _FIXED_BY_FIRST[tok]:
        words = items[i:i + len(expr)]
        if len(words) == len(expr) and all(k == "word" and t == e
                                           for (k, t), e in zip(words, expr)):
          out.append(("stop", " ".join(expr)))  # a boundary, like punctuation
          i += len(expr)
          break
      else:
        out.append(items[i])
        i += 1
    else:
      out.append(items[i])
      i += 1
  return out


def _classes(text: str) -> list[tuple[int, str]]:
  """(class, token) pairs of a sentence, with punctuation as _COMMA / _STOP entries."""
  items = _drop_fixed_expressions(_scan(text))
  out = []
  for kind, tok in items:
    if kind == "word":
      out.append((_word_class(tok), tok))
    elif kind == "join":
      out.append((_CONJ, tok))
    elif kind == "comma":
      out.append((_COMMA, tok))
    else:  # "stop" or "poss"
      out.append((_STOP, tok))
  # "light" is an adjective before a phrase word ("light brown wings"), else a noun ("a light").
  for i, (cls, tok) in enumerate(out):
    if tok == "light" and cls == _ADJ:
      nxt = out[i + 1][0] if i + 1 < len(out) else _STOP
      if nxt not in (_ADJ, _NOUN, _NUM, _CONJ, _COMMA):
        out[i] = (_NOUN, tok)
  return out


def noun_phrases(sentence: str) -> list[str]:
  """The noun phrases of one sentence, in order, as lowercase space-joined tokens.

  "this bird has a black crown as well as a small black bill" -> ["bird", "a black crown",
  "a small black bill"]; "" -> []. See the module docstring for the rules."""
  if sentence is None:
    return []
  items = _classes(sentence)
  phrases: list[str] = []
  chunk: list[tuple[int, str]] = []
  state = {"noun": False, "predicate": False, "after_copula": False}

  def flush():
    if chunk:
      last_cls, last = chunk[-1]
      fallback = (chunk[0][0] in (_DET, _NUM) and last_cls == _ADJ and len(chunk) > 1
                  and last not in _ADJECTIVES and last not in _MODIFIERS
                  and not last.endswith("ly") and "-" not in last)
      if state["noun"] or fallback:  # fallback: "a black tummy" (an unknown -y noun)
        phrases.append(" ".join(tok for _, tok in chunk))
    chunk.clear()
    state["noun"] = False
    state["predicate"] = False

  def start(cls, tok):
    flush()
    chunk.append((cls, tok))
    state["predicate"] = state["after_copula"] and cls == _ADJ

  def next_class(i):
    return items[i + 1][0] if i + 1 < len(items) else _STOP

  for i, (cls, tok) in enumerate(items):
    if cls == _NOUN:
      chunk.append((cls, tok))  # starts a phrase, or continues one (adjectives, a compound)
      state["noun"] = True
      state["after_copula"] = False
    elif cls == _ADJ:
      if state["noun"] or not chunk:
        start(cls, tok)
      else:
        chunk.append((cls, tok))
    elif cls == _NUM:
      state["after_copula"] = False
      if chunk and not state["noun"]:
        chunk.append((cls, tok))  # "a two door coupe", "the first two"
        state["predicate"] = False
      else:
        start(cls, tok)
    elif cls == _DET:
      state["after_copula"] = False
      start(cls, tok)
    elif cls == _CONJ:  # joins adjectives (or numbers) before a noun, else ends the phrase
      if chunk and not state["noun"] and next_class(i) in (_ADJ, _NUM):
        chunk.append((cls, tok))
      else:
        flush()
    elif cls == _COMMA:  # "a small, pointed bill"; never after a noun or in a predicate
      if not (chunk and not state["noun"] and not state["predicate"]
              and next_class(i) in (_ADJ, _NUM)):
        flush()
    elif cls == _COPULA:
      flush()
      state["after_copula"] = True
    else:  # _STOP, _BREAK, _DROP
      flush()
      state["after_copula"] = False
  flush()
  return phrases


# ---------------------------------------------------------------------------------------------
# Vocabulary
# ---------------------------------------------------------------------------------------------


def _as_sentences(text) -> list[str]:
  """None / "" / a str (one sentence) / a list or tuple (or numpy array) of sentences ->
  the list of non-blank sentences."""
  if text is None:
    return []
  if isinstance(text, str):
    return [text] if text.strip() else []
  if isinstance(text, np.ndarray):
    text = text.tolist()
  if isinstance(text, (list, tuple)):
    out = []
    for s in text:
      if isinstance(s, bytes):
        s = s.decode("utf-8")
      if not isinstance(s, str):
        raise TypeError(f"a text's sentences must be str, got {type(s).__name__}")
      if s.strip():
        out.append(s)
    return out
  if isinstance(text, bytes):
    return _as_sentences(text.decode("utf-8"))
  raise TypeError(f"text must be None, a str or a list of str, got {type(text).__name__}")


class Vocabulary:
  """The words of the training texts' noun phrases: id 0 = "<pad>", 1 = "<unk>", then the
  words by descending count, ties alphabetically. `vocab.words[i]` is the word of id i."""

  def __init__(self, words: Sequence[str]):
    words = list(words)
    if words[:2] != [PAD, UNK]:
      raise ValueError(f"a vocabulary starts with {PAD!r}, {UNK!r}, got {words[:2]}")
    index = {}
    for i, w in enumerate(words):
      if not isinstance(w, str) or not w or w != w.strip() or "\n" in w:
        raise ValueError(f"vocabulary entry {i} is not a word: {w!r}")
      if w in index:
        raise ValueError(f"vocabulary word {w!r} appears twice (ids {index[w]} and {i})")
      index[w] = i
    self.words = words
    self._index = index

  @classmethod
  def build(cls, texts: Iterable, min_count: int = 1) -> "Vocabulary":
    """From an iterable of texts (each a sentence or a list of sentences): the words of their
    noun phrases counted at least `min_count` times."""
    if not isinstance(min_count, (int, np.integer)) or min_count < 1:
      raise ValueError(f"config.data.text.min_count must be a positive integer, got "
                       f"{min_count!r}")
    counts: Counter = Counter()
    for text in texts:
      for sentence in _as_sentences(text):
        for phrase in noun_phrases(sentence):
          counts.update(phrase.split())
    for special in (PAD, UNK):
      counts.pop(special, None)
    kept = sorted((w for w, c in counts.items() if c >= min_count), key=lambda w: (-counts[w], w))
    return cls([PAD, UNK] + kept)

  def __len__(self) -> int:
    return len(self.words)

  def __contains__(self, word: str) -> bool:
    return word in self._index

  def __eq__(self, other) -> bool:
    return isinstance(other, Vocabulary) and self.words == other.words

  __hash__ = None

  def __repr__(self) -> str:
    return f"Vocabulary({len(self)} words: {self.words[2:7]}{'...' if len(self) > 7 else ''})"

  def id(self, word: str) -> int:
    """The id of `word`, UNK_ID when it is not in the vocabulary."""
    return self._index.get(word, UNK_ID)

  def ids(self, words: Iterable[str]) -> list[int]:
    return [self._index.get(w, UNK_ID) for w in words]

  def content(self) -> str:
    """The saved file's text: one word a line."""
    return "".join(w + "\n" for w in self.words)

  def sha256(self) -> str:
    """The SHA-256 (hex) of the saved file's content."""
    return hashlib.sha256(self.content().encode("utf-8")).hexdigest()

  def save(self, path: str) -> None:
    """Writes the words, one a line (UTF-8), atomically: `path + ".tmp"`, then os.replace."""
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8", newline="\n") as f:
      f.write(self.content())
    os.replace(tmp, path)

  @classmethod
  def load(cls, path: str) -> "Vocabulary":
    if not os.path.isfile(path):
      raise FileNotFoundError(f"vocabulary file {path} not found")
    try:
      with open(path, encoding="utf-8", newline="") as f:
        lines = f.read().split("\n")
    except UnicodeDecodeError as e:
      raise ValueError(f"vocabulary file {path} is not UTF-8 text: {e}") from None
    if lines and lines[-1] == "":
      lines.pop()
    lines = [w[:-1] if w.endswith("\r") else w for w in lines]
    if lines[:2] != [PAD, UNK]:
      raise ValueError(f"{path} is not an fgjax vocabulary: its first two lines must be "
                       f"{PAD} and {UNK}")
    try:
      return cls(lines)
    except ValueError as e:
      raise ValueError(f"vocabulary file {path}: {e}") from None


# ---------------------------------------------------------------------------------------------
# Fixed-shape encoding
# ---------------------------------------------------------------------------------------------


def _positive(value, key: str) -> int:
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
    raise ValueError(f"config.data.text.{key} must be a positive integer, got {value!r}")
  return int(value)


class TextEncoder:
  """One example's text -> (phrases int32 (max_phrases, max_words), mask bool (max_phrases,)).

  Training ("train_sentences"): "sample" picks one sentence uniformly with the rng, "concat"
  concatenates the phrases of all sentences in order. Evaluation ("eval_sentences"): "all"
  concatenates all sentences' phrases, "first" uses the first sentence. Phrases beyond
  max_phrases are dropped; a phrase longer than max_words keeps its last max_words words (the
  head noun is last). Word ids are left-aligned and padded with PAD_ID; no text gives all zeros
  and an all-False mask. `train_drop` (config.data.text.train_drop): in training, an example's
  whole text is dropped (the missing-text encoding) with this probability, drawn from its rng,
  so that a bi-modal model also learns to read the image alone (off by default: the paper
  trains on every text)."""

  def __init__(self, vocab: Vocabulary, max_phrases: int, max_words: int,
               train_sentences: str = "sample", eval_sentences: str = "all",
               train_drop: float = 0.0):
    if not isinstance(vocab, Vocabulary):
      raise TypeError(f"vocab must be a Vocabulary, got {type(vocab).__name__}")
    self.vocab = vocab
    self.max_phrases = _positive(max_phrases, "max_phrases")
    self.max_words = _positive(max_words, "max_words")
    if train_sentences not in TRAIN_MODES:
      raise ValueError(f"config.data.text.train_sentences must be one of {TRAIN_MODES}, got "
                       f"{train_sentences!r}")
    if eval_sentences not in EVAL_MODES:
      raise ValueError(f"config.data.text.eval_sentences must be one of {EVAL_MODES}, got "
                       f"{eval_sentences!r}")
    self.train_sentences = train_sentences
    self.eval_sentences = eval_sentences
    self.train_drop = float(train_drop)
    if not 0.0 <= self.train_drop < 1.0:
      raise ValueError(f"config.data.text.train_drop must be in [0, 1), got {train_drop!r}")
    self._cache: dict[str, tuple[tuple[int, ...], ...]] = {}

  def __getstate__(self):  # the cache is rebuilt in each worker process, not shipped to it
    state = dict(self.__dict__)
    state["_cache"] = {}
    return state

  def fields(self) -> dict:
    """The batch fields this encoder fills: name -> (shape, dtype)."""
    return {"phrases": ((self.max_phrases, self.max_words), np.int32),
            "phrase_mask": ((self.max_phrases,), np.bool_)}

  def phrase_ids(self, sentence: str) -> tuple[tuple[int, ...], ...]:
    """The word ids of each noun phrase of `sentence` (cached, not truncated)."""
    hit = self._cache.get(sentence)
    if hit is None:
      hit = tuple(tuple(self.vocab.ids(p.split())) for p in noun_phrases(sentence))
      self._cache[sentence] = hit
    return hit

  def encode(self, text, rng: np.random.Generator | None = None, train: bool = False):
    """(phrases int32 (max_phrases, max_words), mask bool (max_phrases,)) of one example's
    text: None, "", one sentence (str) or a list/tuple of sentences."""
    sents = _as_sentences(text)
    if train and self.train_drop > 0:
      if rng is None:
        raise ValueError("config.data.text.train_drop > 0 needs an rng (a numpy Generator)")
      if rng.random() < self.train_drop:
        sents = []
    if train and self.train_sentences == "sample":
      if rng is None:
        raise ValueError("config.data.text.train_sentences='sample' needs an rng "
                         "(a numpy Generator) to pick the sentence")
      if sents:
        sents = [sents[int(rng.integers(len(sents)))]]
    elif not train and self.eval_sentences == "first":
      sents = sents[:1]
    phrases = np.zeros((self.max_phrases, self.max_words), np.int32)
    mask = np.zeros((self.max_phrases,), np.bool_)
    j = 0
    for sentence in sents:
      for ids in self.phrase_ids(sentence):
        if j == self.max_phrases:
          return phrases, mask
        ids = ids[-self.max_words:]
        phrases[j, :len(ids)] = ids
        mask[j] = True
        j += 1
    return phrases, mask

  def decode(self, phrases_row, mask_row) -> list[str]:
    """The phrases of one encoded example as strings ("<unk>" for unknown words)."""
    phrases_row, mask_row = np.asarray(phrases_row), np.asarray(mask_row, bool)
    out = []
    for ids, real in zip(phrases_row, mask_row):
      if real:
        words = []
        for i in ids:
          i = int(i)
          if i == PAD_ID:
            continue
          if not 0 <= i < len(self.vocab):
            raise ValueError(f"word id {i} is outside the vocabulary ({len(self.vocab)} words)")
          words.append(self.vocab.words[i])
        out.append(" ".join(words))
    return out
