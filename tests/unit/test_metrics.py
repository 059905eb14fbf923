"""Task metrics on hand-worked cases: each expected value is derived in the test's docstring or comments.

The VQA normalisation rules are tested one by one; VQA accuracy against the formula and against a
port of the official evaluation loop; captioning scores by hand and against pycocoevalcap's own
pipeline (the PTBTokenizer class; needs java, skipped without it).
"""

from __future__ import annotations

import math
import shutil
import sys

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from qformer_lora import metrics

JAVA = shutil.which("java")
needs_java = pytest.mark.skipif(JAVA is None, reason="the PTB tokenizer jar needs java on PATH")


# --- normalize_vqa_answer: one rule at a time ----------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (" yes \n", "yes"),  # step 1: outer whitespace and the newline go
        ("red\tcar", "red car"),  # step 1: a tab becomes a space
        ("Yes", "yes"),  # step 3: lower-cased
        ("red   car", "red car"),  # step 3: split on whitespace, joined by one space
    ],
)
def test_whitespace_and_case(text, expected):
    assert metrics.normalize_vqa_answer(text) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        # a mark with no space beside it becomes a space (then the split joins words with one space)
        ("3-way", "3 way"),
        ("t-shirt", "t shirt"),
        ("yes/no", "yes no"),
        ("(red)", "red"),  # "(" and ")" -> spaces -> " red " -> "red"
        ("yes!", "yes"),
        ("what?", "what"),
        ("x_y", "x y"),
        ("x+y=z", "x y z"),
        ("red,blue", "red blue"),  # no digit on both sides: the comma is an ordinary mark
        # a mark with a space beside it anywhere in the text is deleted everywhere, not spaced:
        # "x-y -" has " -", so both hyphens go: "x-y -" -> "xy " -> "xy"
        ("x-y -", "xy"),
        ("x-y", "x y"),  # the same word without the " -": spaced
        ("red, blue", "red blue"),  # ", " present: the comma is deleted
        # a digit-comma-digit anywhere deletes every mark: "1,000" -> "1000", and in
        # "1,000 x-y" the hyphen too ("1000 xy", not "1000 x y")
        ("1,000", "1000"),
        ("1,000 x-y", "1000 xy"),
        # marks the script leaves alone: the apostrophe, the colon, "#", "%", "&"
        ("don't", "don't"),
        ("10:30", "10:30"),
        ("#5", "#5"),
        ("50%", "50%"),
        ("r&b", "r&b"),
    ],
)
def test_punctuation_rules(text, expected):
    assert metrics.normalize_vqa_answer(text) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("dr.", "dr"),  # a period not followed by a digit is deleted
        ("5.", "5"),
        ("a.b", "ab"),  # deleted, not spaced; then "ab" is no article
        ("3.5", "3.5"),  # followed by a digit: kept
        (".5", ".5"),
        ("3.5.", "3.5"),  # the first is followed by 5, the last by nothing
        # the script's (?!<=\d) is no look-behind: a period after a digit and before a letter goes
        # ("5.x" -> "5x"); the intended (?<!\d) would have kept it
        ("5.x", "5x"),
        # re.UNICODE (32) passed as sub's count: 33 periods before "x", the first 32 go, one stays
        ("." * 33 + "x", ".x"),
    ],
)
def test_period_rule(text, expected):
    assert metrics.normalize_vqa_answer(text) == expected


@pytest.mark.parametrize(
    ("word", "digit"),
    [
        ("none", "0"),
        ("zero", "0"),
        ("one", "1"),
        ("two", "2"),
        ("three", "3"),
        ("four", "4"),
        ("five", "5"),
        ("six", "6"),
        ("seven", "7"),
        ("eight", "8"),
        ("nine", "9"),
        ("ten", "10"),
    ],
)
def test_number_words(word, digit):
    # lower-casing comes first, so the capitalised word maps too
    assert metrics.normalize_vqa_answer(word) == digit
    assert metrics.normalize_vqa_answer(word.capitalize()) == digit


def test_number_words_stop_at_ten_and_match_whole_words():
    assert metrics.normalize_vqa_answer("eleven") == "eleven"
    assert metrics.normalize_vqa_answer("twenty two") == "twenty 2"
    assert metrics.normalize_vqa_answer("someone") == "someone"  # "one" inside a word stays
    assert metrics.normalize_vqa_answer("Two.") == "2"  # period deleted, lower-cased, mapped


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("a dog", "dog"),
        ("an apple", "apple"),
        ("the cat", "cat"),
        ("The", ""),  # articles only: the empty string
        ("A 3-way", "3 way"),  # "A 3-way" -> "A 3 way" -> "a 3 way" -> "3 way"
        ("a-frame", "frame"),  # the hyphen is spaced first, so "a" becomes a word of its own
        ("theater", "theater"),  # whole words only
        ("vitamin a", "vitamin"),  # a letter "a" is an article to the script too
    ],
)
def test_articles(text, expected):
    assert metrics.normalize_vqa_answer(text) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("dont", "don't"),
        ("isnt", "isn't"),
        ("cant", "can't"),
        ("whats that", "what's that"),
        ("oclock", "o'clock"),
        ("don't", "don't"),  # already with its apostrophe: unchanged
        ("Im", "im"),  # the table's "Im" never matches: the text is lower-cased first (kept quirk)
        ("somebody'd", "somebodyd"),  # the table maps this one backwards (kept quirk)
    ],
)
def test_contractions(text, expected):
    assert metrics.normalize_vqa_answer(text) == expected


def test_tables_have_the_official_sizes():
    """Counted in vqaEval.py at a013f00: 120 distinct contractions, 12 number words, 3 articles, 21 marks."""
    assert len(metrics.CONTRACTIONS) == 120
    assert len(metrics.NUMBER_WORDS) == 12
    assert metrics.ARTICLES == ("a", "an", "the")
    assert len(metrics.PUNCTUATION) == len(set(metrics.PUNCTUATION)) == 21
    assert not {".", "'", ":"} & set(metrics.PUNCTUATION)


def test_normalize_refuses_a_non_string():
    with pytest.raises(TypeError, match="int"):
        metrics.normalize_vqa_answer(2)


# --- vqa_accuracy ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("k", "expected"),
    [
        # accuracy = [k * min((k-1)/3, 1) + (10-k) * min(k/3, 1)] / 10
        (0, 0.0),  # no subset holds a match
        (1, 0.3),  # (1*0 + 9*(1/3)) / 10: only the 9 subsets keeping the matching human score 1/3
        (2, 0.6),  # (2*(1/3) + 8*(2/3)) / 10 = (2/3 + 16/3) / 10
        (3, 0.9),  # (3*(2/3) + 7*1) / 10 = (2 + 7) / 10; min(3/3, 1) would say 1.0
        (4, 1.0),  # (4*min(3/3, 1) + 6*1) / 10: every subset keeps at least 3 matches
        (10, 1.0),
    ],
)
def test_vqa_accuracy_of_k_matching_humans_out_of_ten(k, expected):
    answers = ["red"] * k + ["blue"] * (10 - k)
    assert metrics.vqa_accuracy("red", answers) == pytest.approx(expected)


def test_vqa_accuracy_normalises_both_sides():
    # "Two." and "2" and "two" all normalise to "2": 3 matches of 10 -> 0.9
    answers = ["2", "two", "Two.", "3", "3", "3", "3", "3", "3", "3"]
    assert metrics.vqa_accuracy("two", answers) == pytest.approx(0.9)
    assert metrics.vqa_accuracy("A 3-way", ["3 way"] * 4 + ["no"] * 6) == 1.0


@pytest.mark.parametrize(
    ("n", "k", "expected"),
    [
        (5, 1, 4 / 15),  # (1*0 + 4*(1/3)) / 5
        (5, 5, 1.0),  # each subset keeps 4 matches
        (4, 4, 1.0),  # each subset keeps 3
        (3, 3, 2 / 3),  # each subset keeps 2: a unanimous answer stays below 1 with three humans
        (2, 2, 1 / 3),  # each subset keeps 1
        (2, 1, 1 / 6),  # (1*0 + 1*(1/3)) / 2
    ],
)
def test_vqa_accuracy_with_fewer_answers(n, k, expected):
    assert metrics.vqa_accuracy("red", ["red"] * k + ["blue"] * (n - k)) == pytest.approx(expected)


def test_vqa_accuracy_refuses_too_few_answers_and_bad_types():
    with pytest.raises(ValueError, match="at least 2 human answers.*exact_match"):
        metrics.vqa_accuracy("red", ["red"])
    with pytest.raises(ValueError, match="got 0"):
        metrics.vqa_accuracy("red", [])
    with pytest.raises(TypeError, match="one str"):
        metrics.vqa_accuracy("red", "red")
    with pytest.raises(TypeError, match=r"answers\[1\]"):
        metrics.vqa_accuracy("red", ["red", None])


def official_accuracy(prediction: str, human_answers: list[str]) -> float:
    """One question's accuracy as VQAEval.evaluate computes it (GT-Vision-Lab/VQA a013f00, vqaEval.py).

    A port of the loop's lines for one question (BSD 2-Clause, (c) 2014 Aishwarya Agrawal): the
    answers are dicts with an answer_id, so ``item != gtAnsDatum`` leaves out exactly one human;
    both sides are normalised only when the stripped answers disagree.
    """
    gts = [{"answer": a, "answer_id": i + 1} for i, a in enumerate(human_answers)]
    for ans in gts:
        ans["answer"] = ans["answer"].replace("\n", " ").replace("\t", " ").strip()
    res = prediction.replace("\n", " ").replace("\t", " ").strip()
    if len({ans["answer"] for ans in gts}) > 1:
        for ans in gts:
            ans["answer"] = metrics._process_digit_article(metrics._process_punctuation(ans["answer"]))
        res = metrics._process_digit_article(metrics._process_punctuation(res))
    accuracies = []
    for left_out in gts:
        others = [item for item in gts if item != left_out]
        matching = [item for item in others if item["answer"] == res]
        accuracies.append(min(1, float(len(matching)) / 3))
    return float(sum(accuracies)) / len(accuracies)


RAW_ANSWERS = ["2", "two", "Two.", "yes", "Yes", "yes!", "a dog", "dog", "the dog", "3-way", "3 way", "1,000", "dont"]


@given(
    st.sampled_from(RAW_ANSWERS),
    st.lists(st.sampled_from(RAW_ANSWERS), min_size=2, max_size=12),
)
def test_vqa_accuracy_equals_the_official_loop_when_answers_disagree(prediction, answers):
    """Where the humans disagree the script normalises both sides, as vqa_accuracy always does: equal."""
    assume(len({a.strip() for a in answers}) > 1)
    assert metrics.vqa_accuracy(prediction, answers) == official_accuracy(prediction, answers)


@given(st.sampled_from(["2", "yes", "dog", "3 way", "1000", "don't"]), st.integers(2, 10))
def test_vqa_accuracy_equals_the_official_loop_on_normalised_unanimous_answers(answer, n):
    """Unanimous answers already normalised (as VQA v2's are) and a normalised prediction: equal."""
    assert metrics.vqa_accuracy(answer, [answer] * n) == official_accuracy(answer, [answer] * n)
    assert metrics.vqa_accuracy("other", [answer] * n) == official_accuracy("other", [answer] * n) == 0


def test_vqa_accuracy_differs_from_the_script_where_it_skips_normalisation():
    """Ten identical "yes": the script compares the raw "Yes" with "yes" (0); vqa_accuracy normalises (1)."""
    assert official_accuracy("Yes", ["yes"] * 10) == 0.0
    assert metrics.vqa_accuracy("Yes", ["yes"] * 10) == 1.0


# --- exact_match -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("prediction", "answer", "expected"),
    [
        ("Two.", "2", True),
        (" Yes", "yes", True),
        ("a dog", "dog", True),
        ("dont", "don't", True),
        ("3-way", "3 way", True),
        ("3way", "3 way", False),
        ("#5", "5", False),  # "#" is not a VQA punctuation mark
        ("red", "blue", False),
        ("the", "a", True),  # articles only: both ""
    ],
)
def test_exact_match(prediction, answer, expected):
    assert metrics.exact_match(prediction, answer) is expected


# --- multiple choice ---------------------------------------------------------------------------

COLOURS = ["red", "blue", "green", "yellow"]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("(B)", 1),
        ("(b)", 1),
        ("B", 1),
        ("B.", 1),
        (" C ", 2),
        ("B) blue", 1),
        ("(B) blue", 1),
        ("D: yellow", 3),
        ("B. because it is cold", 1),  # text after the letter that names no option is ignored
        ("The answer is B.", 1),
        ("Answer: (C)", 2),
        ("blue", 1),  # by text
        ("Blue.", 1),  # by normalised text
        ("the green", 2),
        ("(B) red", None),  # the letter says blue, the text says red
        ("(E)", None),  # no fifth option, and "e" names none
        ("it is blue", None),  # no substring search
        ("b", None),  # a bare lower-case letter is no label, and "b" no option text
        ("", None),
        ("purple", None),
    ],
)
def test_choice_by_generation(text, expected):
    assert metrics.choice_by_generation(text, COLOURS) == expected


def test_choice_by_generation_ambiguities():
    # "A red square": "A" followed by a space is an article, so this is text naming option 1
    assert metrics.choice_by_generation("A red square", ["blue circle", "red square"]) == 1
    # two options normalise alike ("blue" and "Blue."): the text names both
    assert metrics.choice_by_generation("blue", ["blue", "Blue.", "red"]) is None
    # the letter B is option 1, the text "B" is option 0
    assert metrics.choice_by_generation("B", ["B", "A"]) is None
    # letter and text agree
    assert metrics.choice_by_generation("B", ["A", "B"]) == 1
    with pytest.raises(ValueError, match="non-empty"):
        metrics.choice_by_generation("B", [])


@pytest.mark.parametrize(
    ("scores", "expected"),
    [
        ([-3.2, -1.5, -2.0], 1),
        ([-1.0, -1.0, -2.0], 0),  # tie: the lowest index
        ([-2.0, -1.0, -1.0], 1),
        ([-math.inf, -math.inf], 0),
        ([-math.inf, -5.0], 1),
        ([0.0], 0),
    ],
)
def test_choice_by_rank(scores, expected):
    assert metrics.choice_by_rank(scores) == expected


def test_choice_by_rank_refuses_nan_and_nothing():
    with pytest.raises(ValueError, match=r"scores\[1\] is NaN"):
        metrics.choice_by_rank([-1.0, math.nan])
    with pytest.raises(ValueError, match="at least one"):
        metrics.choice_by_rank([])


def test_multiple_choice_accuracy():
    # questions 0 and 2 right, 1 unmapped (None), 3 wrong: 2 / 4
    assert metrics.multiple_choice_accuracy([0, None, 2, 1], [0, 1, 2, 3]) == 0.5
    assert metrics.multiple_choice_accuracy([3], [3]) == 1.0
    with pytest.raises(ValueError, match="3 predicted indices for 2 answers"):
        metrics.multiple_choice_accuracy([0, 1, 2], [0, 1])
    with pytest.raises(ValueError, match="at least one"):
        metrics.multiple_choice_accuracy([], [])


# --- captioning: BLEU-4 and CIDEr-D ------------------------------------------------------------


@pytest.mark.parametrize("tokenizer", ["python", pytest.param("ptb", marks=needs_java)])
def test_bleu4_by_hand(tokenizer):
    """Hand-derived corpus BLEU-4 (pycocoevalcap's p_n = (matches + 1e-15) / (n-grams + 1e-9)).

    - A caption equal to its reference: every p_n = 1 (to 1e-9), lengths equal: 1.0.
    - "the cat sat on the mat" against "the cat sat on a mat": clipped 1-grams 5/6 ("the" twice,
      once in the reference), 2-grams 3/5 (the cat, cat sat, sat on), 3-grams 2/4 (the cat sat,
      cat sat on), 4-grams 1/3 (the cat sat on); same length, no penalty: (5/6 * 3/5 * 2/4 *
      1/3)^(1/4) = (1/12)^(1/4) = 0.53728.
    - A three-word caption equal to its reference: no 4-grams, p_4 = 1e-15 / 1e-9 = 1e-6, so
      (1e-6)^(1/4) = 0.031623 (textbook BLEU would be 0/0).
    - Two images, "a b c d" against "a b c d e f" and "w x y z" against itself: all n-grams
      match; c = 8 < r = 10: brevity penalty exp(1 - 10/8) = exp(-0.25) = 0.77880.
    - Captions are lower-cased and punctuation dropped first: "The cat." equals "the cat".
    """
    assert metrics.bleu4({1: "a man rides a horse"}, {1: ["a man rides a horse"]}, tokenizer) == pytest.approx(1.0)
    sat = metrics.bleu4({1: "the cat sat on the mat"}, {1: ["the cat sat on a mat"]}, tokenizer)
    assert sat == pytest.approx(12 ** (-1 / 4))
    assert metrics.bleu4({1: "a cat sits"}, {1: ["a cat sits"]}, tokenizer) == pytest.approx(1e-6**0.25)
    short = metrics.bleu4({1: "a b c d", 2: "w x y z"}, {1: ["a b c d e f"], 2: ["w x y z"]}, tokenizer)
    assert short == pytest.approx(math.exp(-0.25))
    assert metrics.bleu4({1: "The man, riding."}, {1: ["the man riding"]}, tokenizer) == pytest.approx(1e-6**0.25)


def test_bleu4_takes_the_closest_reference_length():
    """Candidate of 4 words; references of 6 and 3 words: the closest is 3, c = 4 >= r: no penalty, 1.0."""
    scores = metrics.bleu4({1: "a b c d"}, {1: ["a b c d e f", "a b c"]}, "python")
    assert scores == pytest.approx(1.0)


@pytest.mark.parametrize("tokenizer", ["python", pytest.param("ptb", marks=needs_java)])
def test_cider_d_by_hand(tokenizer):
    """Hand-derived CIDEr-D (pycocoevalcap's Cider: tf-idf over the scored images' references,
    clipped cosine per n = 1..4, Gaussian length penalty sigma = 6 on bigram counts, x10, mean).

    Two images whose references share no word: every n-gram's document frequency is 1 of 2, so
    every weight is log 2 - log 1 = log 2, and cosines reduce to n-gram counts.
    - Each candidate equal to its four-word reference: cosine 1 for n = 1..4, no length
      difference: 10 * mean(1, 1, 1, 1) = 10 per image, 10 in all.
    - Three-word candidates equal to their references: no 4-grams (a zero vector scores 0):
      10 * (1 + 1 + 1 + 0) / 4 = 7.5.
    - "a b c d" against "a b c d e f" (and "w x y z" against itself, 10): every candidate
      n-gram is in the reference once, so cosine_n = h_n / sqrt(h_n * r_n) = sqrt(h_n / r_n) with
      h = 4, 3, 2, 1 and r = 6, 5, 4, 3: 0.816497, 0.774597, 0.707107, 0.577350, mean 0.718888;
      bigram counts 3 and 5 differ by 2: penalty exp(-4 / 72) = 0.945959; image score 6.800385;
      corpus (6.800385 + 10) / 2 = 8.400193.
    """
    refs4 = {1: ["a b c d"], 2: ["w x y z"]}
    assert metrics.cider_d({1: "a b c d", 2: "w x y z"}, refs4, tokenizer) == pytest.approx(10.0)
    refs3 = {1: ["a b c"], 2: ["w x y"]}
    assert metrics.cider_d({1: "a b c", 2: "w x y"}, refs3, tokenizer) == pytest.approx(7.5)
    cosines = [math.sqrt(h / r) for h, r in zip((4, 3, 2, 1), (6, 5, 4, 3))]
    first = 10 * sum(cosines) / 4 * math.exp(-(2**2) / (2 * 6**2))
    assert first == pytest.approx(6.800385, abs=5e-7)
    got = metrics.cider_d({1: "a b c d", 2: "w x y z"}, {1: ["a b c d e f"], 2: ["w x y z"]}, tokenizer)
    assert got == pytest.approx((first + 10) / 2)


def test_cider_d_of_a_single_image_is_zero():
    """idf = log(1 image) - log(1) = 0 for every n-gram: a perfect caption scores 0 when scored alone."""
    assert metrics.cider_d({1: "a b c d"}, {1: ["a b c d"]}, "python") == 0.0


def test_caption_scores_reports_both_and_the_tokenizer(monkeypatch):
    refs = {1: ["a b c d"], 2: ["w x y z"]}
    scores = metrics.caption_scores({1: "a b c d", 2: "w x y z"}, refs, "python")
    assert (scores.bleu4, scores.cider_d, scores.tokenizer, scores.images) == (
        pytest.approx(1.0),
        pytest.approx(10.0),
        "python",
        2,
    )
    monkeypatch.setattr(metrics.shutil, "which", lambda name: None)  # a machine without java
    assert metrics.caption_scores({1: "a b c d", 2: "w x y z"}, refs).tokenizer == "python"
    with pytest.raises(RuntimeError, match="needs java on PATH.*tokenizer='python'"):
        metrics.caption_scores({1: "a b c d", 2: "w x y z"}, refs, "ptb")


@needs_java
def test_auto_uses_ptb_when_java_is_there():
    assert metrics.tokenize_captions(["A dog."], "auto") == (["a dog"], "ptb")


def test_caption_inputs_are_checked():
    with pytest.raises(ValueError, match=r"1 without a prediction \(first: \[2\]\), 1 without references"):
        metrics.bleu4({1: "a", 3: "b"}, {1: ["a"], 2: ["b"]}, "python")
    with pytest.raises(ValueError, match="references for image 1: expected a non-empty list"):
        metrics.cider_d({1: "a"}, {1: []}, "python")
    with pytest.raises(ValueError, match="references for image 1: expected a non-empty list"):
        metrics.cider_d({1: "a"}, {1: "a"}, "python")
    with pytest.raises(TypeError, match="prediction for image 1"):
        metrics.bleu4({1: None}, {1: ["a"]}, "python")
    with pytest.raises(ValueError, match="empty"):
        metrics.bleu4({}, {}, "python")
    with pytest.raises(ValueError, match="unknown caption tokenizer 'nltk'"):
        metrics.bleu4({1: "a"}, {1: ["a"]}, "nltk")


def test_a_missing_pycocoevalcap_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "pycocoevalcap.bleu.bleu", None)  # import then raises ImportError
    with pytest.raises(ImportError, match=r"pip install 'qformer-lora\[eval\]'"):
        metrics.bleu4({1: "a"}, {1: ["a"]}, "python")


# --- caption tokenisation ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("caption", "tokens"),
    [
        ("A man riding a horse.", "a man riding a horse"),  # lower-cased, the final period dropped
        ("Don't stop, it's a dog's toy!", "do n't stop it 's a dog 's toy"),  # clitics split off
        ("can't won't", "ca n't wo n't"),  # the jar's split keeps "ca" and "wo"
        # brackets become -lrb- -rrb-: the jar lower-cases them too, so pycocoevalcap's drop list
        # ("-LRB-") misses them and they stay; "$" splits off, "3.50" stays whole
        ("The t-shirt costs $3.50 (cheap).", "the t-shirt costs $ 3.50 -lrb- cheap -rrb-"),
        ('He said "hello" -- twice...', "he said hello twice"),  # quotes, "--", "..." dropped
        ("U.S. flag at 1,000 ft; Mr. Smith's car.", "u.s. flag at 1,000 ft mr. smith 's car"),
        ("kids' toys, 50% off", "kids toys 50 % off"),
        ("gonna cannot", "gon na can not"),
        ("don\u2019t \u201chi\u201d", "do n't hi"),  # curly quotes read as straight ones
    ],
)
def test_python_tokenizer_by_hand(caption, tokens):
    assert metrics.tokenize_captions([caption], "python") == ([tokens], "python")


# Typical captions, with the forms the python tokenizer handles; the module lists the rare ones it
# does not (URLs, "?!", "rock'n'roll", abbreviations outside its list such as "no." and "fig.").
CAPTIONS = [
    "A man riding a horse.",
    "Don't stop, it's a dog's toy!",
    "The t-shirt costs $3.50 (cheap).",
    'He said "hello" -- twice...',
    "I'm here; they're there: we'll see.",
    "",
    "   ",
    "U.S. flag at 1,000 ft; Mr. Smith's car.",
    "A cat & a dog, 50% off",
    "can't won't shouldn't isn't CAN'T",
    "Two dogs\tplay.",
    "café naïve — résumé",
    "'quoted' `back`",
    "#1 pick? no!",
    "10:30 am, 1/2 cup",
    "well-known 3-way cross-country",
    "A.",
    "...",
    "it's the dogs' bone",
    "[brackets] {braces}",
    "e.g. i.e. etc.",
    "Hello.World",
    "a--b a - b",
    "gonna gotta wanna cannot lemme",
    "A man. A dog.",
    "Mr. and Mrs. Smith at St. Louis vs. Dr. Who etc.",
    "the dog's. the cat's,",
    "5. 3.50. $5 50%.",
    "a,b 1,2 1, 2",
    "en–dash em—dash a – b",
    "it's 4 o'clock, isn't it?",
    "Bob's car's wheel; D.C. NYC. U.K.'s",
    'The sign reads "STOP".',
    "I'd we'd you'll he'll she'd",
    "don’t it’s “hello” ‘hi’ dogs’",
    "A group of people standing around a kitchen.",
    "Two giraffes, eating leaves from a tall tree.",
    "The man's surfboard is white/blue.",
    "There's a clock on the tower (it's 3:15).",
]


@needs_java
def test_python_tokenizer_agrees_with_the_ptb_jar():
    ptb, used = metrics.tokenize_captions(CAPTIONS, "ptb")
    assert used == "ptb"
    python, _ = metrics.tokenize_captions(CAPTIONS, "python")
    assert [(c, p) for c, p, q in zip(CAPTIONS, ptb, python) if p != q] == []


@needs_java
def test_line_breaks_inside_a_caption_do_not_shift_the_others():
    """The jar also breaks lines at \\r, \\f, \\v, U+2028, U+2029; each becomes a space first."""
    captions = ["a\rb", "c\u2028d", "e\x0cf", "g\x0bh", "i\u2029j", "k\nl", "last"]
    tokens, _ = metrics.tokenize_captions(captions, "ptb")
    assert tokens == ["a b", "c d", "e f", "g h", "i j", "k l", "last"]


@needs_java
def test_matches_pycocoevalcaps_own_pipeline():
    """PTBTokenizer class -> Bleu(4) / Cider(), as pycocoevalcap's COCOEvalCap runs them, on a small corpus."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    predictions = {
        7: "A man riding a brown horse.",
        8: "Two dogs play with a ball!",
        9: "A plate of food (rice) on a table.",
    }
    references = {
        7: ["A man rides a horse on a beach.", "Someone riding a brown horse.", "a man on a horse"],
        8: ["Two dogs playing with a red ball.", "Dogs play in the grass."],
        9: ["A plate with rice and chicken.", "Food on a wooden table.", "A dish of rice, on a table."],
    }
    tokenizer = PTBTokenizer()
    gts = tokenizer.tokenize({i: [{"caption": c} for c in refs] for i, refs in references.items()})
    res = tokenizer.tokenize({i: [{"caption": c}] for i, c in predictions.items()})
    bleu = Bleu(4).compute_score(gts, res, verbose=0)[0][3]
    cider = Cider().compute_score(gts, res)[0]
    scores = metrics.caption_scores(predictions, references, "ptb")
    assert (scores.bleu4, scores.cider_d) == (bleu, cider)
    assert 0 < bleu < 1 and 0 < cider  # a corpus that exercises partial matches
    python = metrics.caption_scores(predictions, references, "python")
    assert (python.bleu4, python.cider_d) == (bleu, cider)  # same tokens, same scores
