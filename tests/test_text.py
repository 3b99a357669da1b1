"""fgjax.text: the rule-based noun-phrase chunker on CUB-style bird and car descriptions, the
vocabulary (determinism, round trip, errors) and the fixed-shape phrase encoder (shapes,
truncation, sentence sampling, missing text, pickling)."""
import hashlib
import os
import pickle

import numpy as np
import pytest

from fgjax import text as fgtext
from fgjax.text import (PAD_ID, UNK_ID, TextEncoder, Vocabulary, noun_phrases, sentences,
                        tokenize)

# Descriptions in the style of the CUB captions (Reed et al. 2016) and a few of cars, with the
# phrases a reader would mark.
CASES = [
    # The examples.
    ("this bird has a black crown as well as a small black bill",
     ["bird", "a black crown", "a small black bill"]),
    ("black and white wings", ["black and white wings"]),
    ("wings that are black", ["wings"]),
    ("a red beak, a blue crest and a yellow throat", ["a red beak", "a blue crest",
                                                      "a yellow throat"]),
    ("a white belly and breast", ["a white belly", "breast"]),
    # Captions.
    ("this bird has wings that are brown and has a white belly",
     ["bird", "wings", "a white belly"]),
    ("a small bird with a red crown and a short pointed bill",
     ["a small bird", "a red crown", "a short pointed bill"]),
    ("This bird is mostly yellow with a black crown and two white wing bars.",
     ["bird", "a black crown", "two white wing bars"]),
    ("the bird has a long, slender, black bill and grey and white plumage",
     ["the bird", "a long slender black bill", "grey and white plumage"]),
    ("a bird with a short, orange bill and brown tail feathers.",
     ["a bird", "a short orange bill", "brown tail feathers"]),
    ("the belly is white, wings are brown", ["the belly", "wings"]),
    ("this bird's head is black; its throat is bright red.", ["bird", "head", "throat"]),
    ("it's belly is white and it has a short orange-red beak",
     ["belly", "a short orange-red beak"]),
    ("a medium-sized bird with a curved bill and brownish speckled wings",
     ["a medium-sized bird", "a curved bill", "brownish speckled wings"]),
    ("this is a small brown bird with a white eyebrow and a pointy beak.",
     ["a small brown bird", "a white eyebrow", "a pointy beak"]),
    ("the bird has a black head, white cheeks, and a brown back",
     ["the bird", "a black head", "white cheeks", "a brown back"]),
    ("this bird has a black tummy and a red rump", ["bird", "a black tummy", "a red rump"]),
    ("a bird with a lot of brown and a white breast", ["a bird", "a white breast"]),
    ("there are two wing bars on the wing and the tail is long",
     ["two wing bars", "the wing", "the tail"]),
    ("this bird has no wing bars and a plain grey body",
     ["bird", "no wing bars", "a plain grey body"]),
    ("the bird is brown in color with a white throat", ["the bird", "a white throat"]),
    ("a black bird with a red and yellow patch on its wing",
     ["a black bird", "a red and yellow patch", "wing"]),
    ("a small bird with a very long tail and a bright red throat",
     ["a small bird", "a very long tail", "a bright red throat"]),
    ("the white breasted bird has grey wings and a short black beak",
     ["the white breasted bird", "grey wings", "a short black beak"]),
    ("medium sized bird with a long neck and webbed feet",
     ["medium sized bird", "a long neck", "webbed feet"]),
    ("this bird is black with a light belly", ["bird", "a light belly"]),
    ("the bird has a yellow crown and nape", ["the bird", "a yellow crown", "nape"]),
    ("this bird has a bright orange-red breast, grey-brown wings and a white rump.",
     ["bird", "a bright orange-red breast", "grey-brown wings", "a white rump"]),
    ("a bird with 2 white wing-bars and a long tail", ["a bird", "2 white wing-bars",
                                                       "a long tail"]),
    ("this bird has a short stubby bill which is pointed at the end",
     ["bird", "a short stubby bill", "the end"]),
    ("bird with a red eyering, a black superciliary and yellow lores",
     ["bird", "a red eyering", "a black superciliary", "yellow lores"]),
    ("the bird has a small head with a long pointed bill that curves downward",
     ["the bird", "a small head", "a long pointed bill"]),
    ("a yellowish bird with olive wings and a white-tipped tail",
     ["a yellowish bird", "olive wings", "a white-tipped tail"]),
    ("its wings are brown with white edges and its belly is cream colored",
     ["wings", "white edges", "belly"]),
    ("the bird's bill is long and thin, and its feathers are mostly grey",
     ["the bird", "bill", "feathers"]),
    ("a tiny bird with a needle-like beak and iridescent green feathers",
     ["a tiny bird", "a needle-like beak", "iridescent green feathers"]),
    ("this bird has a white belly and breast with a grey crown and wings",
     ["bird", "a white belly", "breast", "a grey crown", "wings"]),
    ("the bird is white, grey and black with an orange bill", ["the bird", "an orange bill"]),
    ("this bird is completely black except for its red eyes", ["bird", "red eyes"]),
    # The synthetic birds' descriptions (fgjax.data.synthetic).
    ("a pale grey bird with a magenta beak, a cyan crest and a green throat.",
     ["a pale grey bird", "a magenta beak", "a cyan crest", "a green throat"]),
    ("a teal-grey bird with an orange beak, a red crest and a blue throat.",
     ["a teal-grey bird", "an orange beak", "a red crest", "a blue throat"]),
    # Cars.
    ("the car is a red sedan with four doors and chrome wheels",
     ["the car", "a red sedan", "four doors", "chrome wheels"]),
    ("a two-door coupe with a black roof and silver rims",
     ["a two-door coupe", "a black roof", "silver rims"]),
    ("a blue SUV with a roof rack and tinted windows.",
     ["a blue suv", "a roof rack", "tinted windows"]),
    ("the car's front light is round and the bumper is chrome",
     ["the car", "front light", "the bumper"]),
    ("a silver hatchback with alloy wheels and a rear spoiler",
     ["a silver hatchback", "alloy wheels", "a rear spoiler"]),
    ("a large sports car with two doors, a spoiler and bright red paint",
     ["a large sports car", "two doors", "a spoiler", "bright red paint"]),
    ("the four door sedan is grey and has tinted windows",
     ["the four door sedan", "tinted windows"]),
    # Case, whitespace and punctuation.
    ("   THE BIRD HAS A   YELLOW    BELLY,,  AND   BLACK WINGS!!  ",
     ["the bird", "a yellow belly", "black wings"]),
    ("a bird\u2019s wings: black & white; its bill\tlong...", ["a bird", "wings", "bill"]),
]


@pytest.mark.parametrize("sentence,expected", CASES, ids=[c[0][:40] for c in CASES])
def test_noun_phrases(sentence, expected):
  assert noun_phrases(sentence) == expected


@pytest.mark.parametrize("empty", ["", "   ", "...", ", , ;", "\n", None])
def test_noun_phrases_of_nothing(empty):
  assert noun_phrases(empty) == []


def test_adjective_rules():
  # Suffix adjectives before a noun stay in the phrase; a predicate adjective makes no phrase.
  assert noun_phrases("a fluffy, spotted and greyish breast") == [
      "a fluffy spotted and greyish breast"]
  assert noun_phrases("the wings are spotted") == ["the wings"]
  # The nouns the suffix rules would take for adjectives stay nouns.
  assert noun_phrases("a grey body and belly") == ["a grey body", "belly"]
  assert noun_phrases("a white wing and a black head") == ["a white wing", "a black head"]


def test_phrase_invariants_on_random_word_salad():
  # Any sequence of lexicon words, unknown words and punctuation: every phrase is a run of the
  # sentence's tokens, never starts or ends with "and"/"or", and ends with a noun (or adjective
  # taken as one); nothing raises.
  words = sorted(fgtext._ADJECTIVES | fgtext._NOUNS | fgtext._VERBS | fgtext._COPULAS
                 | fgtext._PREPOSITIONS | fgtext._KEPT_DETERMINERS
                 | fgtext._DROPPED_DETERMINERS | fgtext._NUMBERS
                 | {"and", "or", "bird", "wings", "xyzzy", ",", ".", ";", "'s", "-", "7"})
  rng = np.random.default_rng(0)
  for _ in range(2000):
    sentence = " ".join(rng.choice(words, rng.integers(0, 15)))
    tokens = " " + " ".join(tokenize(sentence)) + " "
    for phrase in noun_phrases(sentence):
      w = phrase.split()
      assert w and w[0] not in ("and", "or") and w[-1] not in ("and", "or"), sentence
      assert " " + phrase + " " in tokens, (sentence, phrase)
      assert fgtext._word_class(w[-1]) in (fgtext._NOUN, fgtext._ADJ), (sentence, phrase)


def test_tokenize():
  assert tokenize("It's a Bird's  wing-bar, doesn't it? ORANGE\u2010red") == [
      "it's", "a", "bird", "wing-bar", "doesn't", "it", "orange-red"]
  assert tokenize("") == []
  assert tokenize("4 doors; 2 mirrors.") == ["4", "doors", "2", "mirrors"]


def test_sentences():
  content = "this bird is red\n\n  a small bird with a black bill  \r\nlast line"
  assert sentences(content) == ["this bird is red", "a small bird with a black bill",
                                "last line"]
  assert sentences("") == [] and sentences("\n \n") == []


TEXTS = ["a red beak and a red crest",            # a:2 red:2 beak crest
         ["this bird has brown wings", "a red throat"],  # bird brown wings / a red throat
         "the bird is small"]                     # the bird


def test_vocabulary_build_counts_phrase_words_deterministically():
  vocab = Vocabulary.build(TEXTS)
  # a: 3, red: 3, bird: 2, then the words seen once alphabetically; "has", "is", "this",
  # "small" (a predicate) are not in any phrase.
  assert vocab.words == ["<pad>", "<unk>", "a", "red", "bird", "beak", "brown", "crest", "the",
                         "throat", "wings"]
  assert len(vocab) == 11
  assert Vocabulary.build(list(reversed(TEXTS))) == vocab
  assert Vocabulary.build(TEXTS, min_count=2).words == ["<pad>", "<unk>", "a", "red", "bird"]
  assert Vocabulary.build([None, "", []]).words == ["<pad>", "<unk>"]
  assert vocab.id("red") == 3 and vocab.id("zebra") == UNK_ID
  assert vocab.ids(["a", "zebra", "wings"]) == [2, UNK_ID, 10]
  assert vocab != Vocabulary.build(TEXTS[:1])
  with pytest.raises(ValueError, match="min_count"):
    Vocabulary.build(TEXTS, min_count=0)


def test_vocabulary_save_load(tmp_path):
  vocab = Vocabulary.build(TEXTS + ["a caf\u00e9-brown bird"])
  path = str(tmp_path / "vocab.txt")
  vocab.save(path)
  assert not os.path.exists(path + ".tmp")
  raw = open(path, "rb").read()
  assert raw.decode("utf-8").split("\n")[:3] == ["<pad>", "<unk>", "a"]
  assert vocab.sha256() == hashlib.sha256(raw).hexdigest()
  loaded = Vocabulary.load(path)
  assert loaded == vocab and loaded.sha256() == vocab.sha256()
  assert "caf\u00e9-brown" in loaded
  # Saving again replaces the file whole.
  small = Vocabulary.build(["a red crest"])
  small.save(path)
  assert Vocabulary.load(path) == small


def test_vocabulary_load_errors(tmp_path):
  missing = str(tmp_path / "nope" / "vocab.txt")
  with pytest.raises(FileNotFoundError, match="nope/vocab.txt"):
    Vocabulary.load(missing)
  bad = tmp_path / "bad.txt"
  bad.write_text("red\nbird\n", encoding="utf-8")
  with pytest.raises(ValueError, match="bad.txt"):
    Vocabulary.load(str(bad))
  dup = tmp_path / "dup.txt"
  dup.write_text("<pad>\n<unk>\nred\nred\n", encoding="utf-8")
  with pytest.raises(ValueError, match="dup.txt"):
    Vocabulary.load(str(dup))


VOCAB = Vocabulary.build(["a small bird with a red crown and a short pointed bill",
                          "this bird has black and white wings", "the bird has a yellow belly"])
SENTS = ["a small bird with a red crown",         # 2 phrases
         "this bird has black and white wings",   # 2 phrases
         "the bird has a yellow belly"]           # 2 phrases


def _enc(**kw):
  args = dict(max_phrases=4, max_words=3)
  args.update(kw)
  return TextEncoder(VOCAB, **args)


def test_encoder_shapes_padding_and_unknown_words():
  enc = _enc()
  assert enc.fields() == {"phrases": ((4, 3), np.int32), "phrase_mask": ((4,), np.bool_)}
  phrases, mask = enc.encode("a purple bird with a red crown")
  assert phrases.shape == (4, 3) and phrases.dtype == np.int32
  assert mask.shape == (4,) and mask.dtype == np.bool_
  assert mask.tolist() == [True, True, False, False]
  ids = VOCAB.ids
  np.testing.assert_array_equal(phrases[0], ids(["a", "purple", "bird"]))  # purple -> UNK
  assert phrases[0, 1] == UNK_ID
  np.testing.assert_array_equal(phrases[1], ids(["a", "red", "crown"]))
  assert (phrases[2:] == PAD_ID).all()
  assert enc.decode(phrases, mask) == ["a <unk> bird", "a red crown"]
  # A short phrase is left-aligned and padded.
  phrases, mask = enc.encode("wings")
  assert phrases[0].tolist() == [VOCAB.id("wings"), PAD_ID, PAD_ID] and mask.sum() == 1


def test_encoder_truncation():
  # A phrase longer than max_words keeps its last words (the head noun); extra phrases drop.
  enc = _enc(max_phrases=2, max_words=2)
  phrases, mask = enc.encode("a short pointed bill, a red crown and a yellow belly")
  assert mask.tolist() == [True, True]
  assert enc.decode(phrases, mask) == ["pointed bill", "red crown"]


@pytest.mark.parametrize("missing", [None, "", "   ", [], (), ["", "  "], "that is it"])
def test_encoder_missing_text(missing):
  for train in (False, True):
    phrases, mask = _enc().encode(missing, rng=np.random.default_rng(0), train=train)
    assert phrases.shape == (4, 3) and not phrases.any() and not mask.any()


def _phrases_of(enc, sentence):
  return enc.decode(*enc.encode(sentence))


def test_encoder_sample_mode():
  enc = _enc(train_sentences="sample")
  per_sentence = [_phrases_of(enc, s) for s in SENTS]
  picks = []
  for seed in range(24):
    a = enc.encode(SENTS, rng=np.random.default_rng(seed), train=True)
    b = enc.encode(SENTS, rng=np.random.default_rng(seed), train=True)
    np.testing.assert_array_equal(a[0], b[0])  # deterministic for a seed
    np.testing.assert_array_equal(a[1], b[1])
    got = enc.decode(*a)
    assert got in per_sentence  # exactly one sentence's phrases
    picks.append(per_sentence.index(got))
  assert set(picks) == {0, 1, 2}  # every sentence gets picked across rngs
  with pytest.raises(ValueError, match="train_sentences"):
    enc.encode(SENTS, train=True)  # sample needs an rng


def test_encoder_concat_all_first():
  all_phrases = sum((noun_phrases(s) for s in SENTS), [])
  assert len(all_phrases) == 6
  concat = _enc(max_phrases=8, max_words=4, train_sentences="concat")
  got = concat.decode(*concat.encode(SENTS, train=True))
  assert got == all_phrases
  # Concat ignores the rng; eval "all" gives the same; both truncate to max_phrases in order.
  enc = _enc(max_phrases=5, max_words=4, train_sentences="concat", eval_sentences="all")
  train = enc.encode(SENTS, rng=np.random.default_rng(1), train=True)
  evals = enc.encode(tuple(SENTS))
  np.testing.assert_array_equal(train[0], evals[0])
  assert enc.decode(*evals) == all_phrases[:5]
  first = _enc(max_phrases=8, max_words=4, eval_sentences="first")
  assert first.decode(*first.encode(SENTS)) == noun_phrases(SENTS[0])
  assert first.decode(*first.encode(SENTS[1])) == noun_phrases(SENTS[1])
  # Eval never samples, even when training does.
  sample = _enc(max_phrases=8, max_words=4)
  assert sample.decode(*sample.encode(SENTS)) == all_phrases


@pytest.mark.parametrize("kw,key", [
    (dict(max_phrases=0), "max_phrases"), (dict(max_words=-1), "max_words"),
    (dict(max_words=2.5), "max_words"), (dict(train_sentences="random"), "train_sentences"),
    (dict(eval_sentences="last"), "eval_sentences")])
def test_encoder_config_errors(kw, key):
  with pytest.raises(ValueError, match=f"config.data.text.{key}"):
    _enc(**kw)


def test_encoder_caches_chunking(monkeypatch):
  calls = []
  real = fgtext.noun_phrases
  monkeypatch.setattr(fgtext, "noun_phrases", lambda s: calls.append(s) or real(s))
  enc = _enc(train_sentences="concat")
  for _ in range(3):
    enc.encode(SENTS, train=True)
    enc.encode(SENTS[0])
  assert sorted(calls) == sorted(SENTS)  # each sentence chunked once


def test_encoder_pickles():
  enc = _enc(train_sentences="sample", eval_sentences="first")
  enc.encode(SENTS)  # fills the cache
  clone = pickle.loads(pickle.dumps(enc))
  assert clone.vocab == enc.vocab and clone._cache == {}
  assert (clone.train_sentences, clone.eval_sentences) == ("sample", "first")
  for seed in range(3):
    a = enc.encode(SENTS, rng=np.random.default_rng(seed), train=True)
    b = clone.encode(SENTS, rng=np.random.default_rng(seed), train=True)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])


def test_train_drop_drops_whole_texts_in_training_only():
  vocab = Vocabulary.build(["a red beak", "a blue crest"])
  enc = TextEncoder(vocab, 4, 4, train_sentences="concat", train_drop=0.5)
  sents = ["a red beak", "a blue crest"]
  dropped = [not enc.encode(sents, rng=np.random.default_rng(i), train=True)[1].any()
             for i in range(400)]
  assert 0.4 < np.mean(dropped) < 0.6  # binomial(400, 0.5): sd 0.025, a 4-sd band
  kept = enc.encode(sents, rng=np.random.default_rng(1), train=True)
  assert all(enc.encode(sents, rng=np.random.default_rng(1), train=True)[0].tolist() ==
             kept[0].tolist() for _ in range(3))  # the same rng drops the same examples
  assert enc.encode(sents)[1].sum() == 2  # evaluation never drops
  plain = TextEncoder(vocab, 4, 4, train_sentences="concat")
  assert all(plain.encode(sents, rng=np.random.default_rng(i), train=True)[1].sum() == 2
             for i in range(50))
  with pytest.raises(ValueError, match="train_drop"):
    TextEncoder(vocab, 4, 4, train_drop=1.0)
