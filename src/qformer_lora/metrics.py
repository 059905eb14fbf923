"""Task metrics as the field defines them: VQA accuracy, exact match, multiple choice, BLEU-4, CIDEr-D.

Pure functions on strings and numbers; no model code. The ``evaluate`` command decides which
metric a dataset gets and feeds these functions the generated texts (or candidate scores).

VQA answers (``normalize_vqa_answer``, ``vqa_accuracy``, ``exact_match``)
    A port of the official VQA evaluation, ``PythonEvaluationTools/vqaEvaluation/vqaEval.py`` of
    https://github.com/GT-Vision-Lab/VQA at commit a013f0043c1e2cdc995922dfe257f7149aa9af06
    (2021-03-11, "Fixed processing answers bug"; identical tables in salesforce/LAVIS
    ``lavis/common/vqa_tools/vqa_eval.py``, the evaluation InstructBLIP reports). The tables
    below (``CONTRACTIONS``, ``NUMBER_WORDS`` = the script's ``manualMap``, ``ARTICLES``,
    ``PUNCTUATION`` = its ``punct``) are that file's data, copied unchanged, quirks included;
    that file is Copyright (c) 2014, Aishwarya Agrawal, under the BSD 2-Clause licence in the
    repository's ``license.txt``.

Multiple choice (``choice_by_generation``, ``choice_by_rank``, ``multiple_choice_accuracy``)
    By generation: the generated text names an option by its letter or its text. By rank: each
    option's log-likelihood under the model (InstructBLIP's ScienceQA / IconQA evaluation); the
    scoring itself runs the model and lives with the caller, the choice among scores lives here.

Captioning (``caption_scores``, ``bleu4``, ``cider_d``)
    The scorers of pycocoevalcap (https://github.com/salaniz/pycocoevalcap, the Python 3 port of
    the COCO caption evaluation, tylin/coco-caption), installed by ``pip install
    'qformer-lora[eval]'``; not vendored: its BLEU scorer carries a "do not redistribute" notice.
    Captions are tokenised first, as the COCO evaluation does; ``CAPTION_TOKENIZERS`` says how.
"""

from __future__ import annotations

import math
import re
import shutil
import subprocess
import tempfile
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

# ---------------------------------------------------------------------------------------------
# VQA answers: the tables of vqaEval.py (GT-Vision-Lab/VQA a013f00), unchanged
# ---------------------------------------------------------------------------------------------

# `contractions`: a spelling without its apostrophe -> the one with it. Quirks kept as there: the
# keys with a capital I never match (the text is lower-cased first); "somebody'd" -> "somebodyd".
CONTRACTIONS = {
    "aint": "ain't",
    "arent": "aren't",
    "cant": "can't",
    "couldve": "could've",
    "couldnt": "couldn't",
    "couldn'tve": "couldn't've",
    "couldnt've": "couldn't've",
    "didnt": "didn't",
    "doesnt": "doesn't",
    "dont": "don't",
    "hadnt": "hadn't",
    "hadnt've": "hadn't've",
    "hadn'tve": "hadn't've",
    "hasnt": "hasn't",
    "havent": "haven't",
    "hed": "he'd",
    "hed've": "he'd've",
    "he'dve": "he'd've",
    "hes": "he's",
    "howd": "how'd",
    "howll": "how'll",
    "hows": "how's",
    "Id've": "I'd've",
    "I'dve": "I'd've",
    "Im": "I'm",
    "Ive": "I've",
    "isnt": "isn't",
    "itd": "it'd",
    "itd've": "it'd've",
    "it'dve": "it'd've",
    "itll": "it'll",
    "let's": "let's",
    "maam": "ma'am",
    "mightnt": "mightn't",
    "mightnt've": "mightn't've",
    "mightn'tve": "mightn't've",
    "mightve": "might've",
    "mustnt": "mustn't",
    "mustve": "must've",
    "neednt": "needn't",
    "notve": "not've",
    "oclock": "o'clock",
    "oughtnt": "oughtn't",
    "ow's'at": "'ow's'at",
    "'ows'at": "'ow's'at",
    "'ow'sat": "'ow's'at",
    "shant": "shan't",
    "shed've": "she'd've",
    "she'dve": "she'd've",
    "she's": "she's",
    "shouldve": "should've",
    "shouldnt": "shouldn't",
    "shouldnt've": "shouldn't've",
    "shouldn'tve": "shouldn't've",
    "somebody'd": "somebodyd",
    "somebodyd've": "somebody'd've",
    "somebody'dve": "somebody'd've",
    "somebodyll": "somebody'll",
    "somebodys": "somebody's",
    "someoned": "someone'd",
    "someoned've": "someone'd've",
    "someone'dve": "someone'd've",
    "someonell": "someone'll",
    "someones": "someone's",
    "somethingd": "something'd",
    "somethingd've": "something'd've",
    "something'dve": "something'd've",
    "somethingll": "something'll",
    "thats": "that's",
    "thered": "there'd",
    "thered've": "there'd've",
    "there'dve": "there'd've",
    "therere": "there're",
    "theres": "there's",
    "theyd": "they'd",
    "theyd've": "they'd've",
    "they'dve": "they'd've",
    "theyll": "they'll",
    "theyre": "they're",
    "theyve": "they've",
    "twas": "'twas",
    "wasnt": "wasn't",
    "wed've": "we'd've",
    "we'dve": "we'd've",
    "weve": "we've",
    "werent": "weren't",
    "whatll": "what'll",
    "whatre": "what're",
    "whats": "what's",
    "whatve": "what've",
    "whens": "when's",
    "whered": "where'd",
    "wheres": "where's",
    "whereve": "where've",
    "whod": "who'd",
    "whod've": "who'd've",
    "who'dve": "who'd've",
    "wholl": "who'll",
    "whos": "who's",
    "whove": "who've",
    "whyll": "why'll",
    "whyre": "why're",
    "whys": "why's",
    "wont": "won't",
    "wouldve": "would've",
    "wouldnt": "wouldn't",
    "wouldnt've": "wouldn't've",
    "wouldn'tve": "wouldn't've",
    "yall": "y'all",
    "yall'll": "y'all'll",
    "y'allll": "y'all'll",
    "yall'd've": "y'all'd've",
    "y'alld've": "y'all'd've",
    "y'all'dve": "y'all'd've",
    "youd": "you'd",
    "youd've": "you'd've",
    "you'dve": "you'd've",
    "youll": "you'll",
    "youre": "you're",
    "youve": "you've",
}
# `manualMap`: number words up to ten -> digits; "none" counts as zero
NUMBER_WORDS = {
    "none": "0",
    "zero": "0",
    "one": "1",
    "two": "2",
    "three": "3",
    "four": "4",
    "five": "5",
    "six": "6",
    "seven": "7",
    "eight": "8",
    "nine": "9",
    "ten": "10",
}
# `articles`
ARTICLES = ("a", "an", "the")
# `punct`. Not in it: the period (its own rule below), the apostrophe ("don't" keeps it), ":", "#",
# "$", "%", "&", "*", "|", "~", "^".
PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!")
# `periodStrip`: a period not followed by a digit. The script meant (?<!\d), "not after a digit",
# but wrote (?!<=\d), a look-ahead for the two characters "<=" that always succeeds in front of a
# "."; so "5." loses its period, "3.5" and ".5" keep theirs. Kept as written: it is the metric.
_PERIOD = re.compile(r"(?!<=\d)(\.)(?!\d)")
# `commaStrip`: a digit, a comma, a digit (a thousands separator)
_DIGIT_COMMA = re.compile(r"(\d)(,)(\d)")
# The script calls periodStrip.sub("", text, re.UNICODE): the flag's value (32) lands in the
# `count` argument, so at most 32 periods are deleted. Kept, so long texts normalise as there.
_PERIOD_COUNT = int(re.UNICODE)


def normalize_vqa_answer(text: str) -> str:
    """``text`` normalised as the official VQA evaluation normalises answers, step by step.

    1. Newlines and tabs become spaces; leading and trailing whitespace goes.
    2. Punctuation (vqaEval.py ``processPunctuation``), for each mark in ``PUNCTUATION``:
       deleted when the text has the mark next to a space ("3 - way" -> "3  way", "yes !" ->
       "yes ") or has a digit-comma-digit anywhere ("1,000" -> "1000"; then every mark is
       deleted: "1,000/day" -> "1000day"); otherwise it becomes a space ("3-way" -> "3 way",
       "t-shirt" -> "t shirt", "yes!" -> "yes "). Then every period not followed by a digit is
       deleted ("dr." -> "dr", "5." -> "5", "3.5" stays, at most 32 of them: see ``_PERIOD_COUNT``).
    3. Words (vqaEval.py ``processDigitArticle``): lower-cased and split on whitespace; number
       words to ten become digits (``NUMBER_WORDS``: "two" -> "2", "none" -> "0", "eleven"
       stays); the articles "a", "an", "the" are dropped; a contraction written without its
       apostrophe gets it (``CONTRACTIONS``: "dont" -> "don't", "isnt" -> "isn't"); words are
       joined by single spaces.

    So "A 3-way" -> "a 3 way" -> "3 way"; "Two." -> "Two" -> "2"; "the" -> "" (an answer of
    articles only normalises to the empty string).

    Source: https://github.com/GT-Vision-Lab/VQA/blob/a013f0043c1e2cdc995922dfe257f7149aa9af06/
    PythonEvaluationTools/vqaEvaluation/vqaEval.py (``evaluate``, ``processPunctuation``,
    ``processDigitArticle``), ported with its tables and quirks. Raises TypeError for a non-str.
    """
    if not isinstance(text, str):
        raise TypeError(f"an answer must be a str, got {type(text).__name__}: {text!r}")
    text = text.replace("\n", " ").replace("\t", " ").strip()
    return _process_digit_article(_process_punctuation(text))


def _process_punctuation(text: str) -> str:
    """vqaEval.py's ``processPunctuation`` (step 2 of ``normalize_vqa_answer``)."""
    out = text
    every_mark = _DIGIT_COMMA.search(text) is not None
    for mark in PUNCTUATION:
        # the script tests the text as given, not as rewritten so far
        if every_mark or mark + " " in text or " " + mark in text:
            out = out.replace(mark, "")
        else:
            out = out.replace(mark, " ")
    return _PERIOD.sub("", out, count=_PERIOD_COUNT)


def _process_digit_article(text: str) -> str:
    """vqaEval.py's ``processDigitArticle`` (step 3 of ``normalize_vqa_answer``)."""
    words = [NUMBER_WORDS.get(word, word) for word in text.lower().split()]
    return " ".join(CONTRACTIONS.get(word, word) for word in words if word not in ARTICLES)


def vqa_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """VQA accuracy of one prediction against the human answers, in [0, 1].

    Definition (Antol et al., "VQA: Visual Question Answering", ICCV 2015; the official script
    above): the prediction and every human answer are normalised (``normalize_vqa_answer``);
    then each human in turn is left out, the prediction scores min(#matching others / 3, 1)
    against the remaining answers, and the scores are averaged. With k of the n answers
    matching, leaving out a matching human leaves k - 1 matches, any other human k, so

        accuracy = [k * min((k - 1) / 3, 1) + (n - k) * min(k / 3, 1)] / n.

    For the usual n = 10: k = 0 -> 0; k = 1 -> (1*0 + 9/3) / 10 = 0.3; k = 2 -> (2/3 + 8*2/3) / 10
    = 0.6; k = 3 -> (3*2/3 + 7*1) / 10 = 0.9; k >= 4 -> 1. That is 0.3 k capped at 1 (the soft
    score min(1, 0.3 k) of VQA training code), not the simpler min(k / 3, 1), which would give
    1/3, 2/3 and 1.0 for k = 1, 2, 3: with three matching humans, the subsets that leave one of
    them out hold only two.

    Any n >= 2 is accepted and scored by the same formula (the leave-one-out mean over the n
    answers). With fewer than four answers even a unanimous match stays below 1: k = n gives
    (n - 1) / 3, so 1/3 for two answers, 2/3 for three. A single answer leaves no one to compare
    with (every prediction would score 0): ValueError; use ``exact_match`` for such data.

    One deliberate difference from the script: it normalises only when the human answers
    disagree (``len(set(gtAnswers)) > 1``), relying on the released VQA annotations being
    normalised already; here both sides are always normalised, so a prediction "Yes" against ten
    "yes" scores 1 here and 0 there. Where the answers disagree, or are normalised already and
    so is the prediction, the two agree exactly (tests/unit/test_metrics.py compares them).

    Raises TypeError for a non-str prediction or answer (naming its index), ValueError for fewer
    than two answers.
    """
    if isinstance(answers, str):
        raise TypeError(f"answers must be a sequence of str, got one str: {answers!r}")
    if len(answers) < 2:
        raise ValueError(
            f"VQA accuracy needs at least 2 human answers (leave-one-out over them), got {len(answers)}: "
            f"{list(answers)!r}; score single-answer data with exact_match"
        )
    predicted = normalize_vqa_answer(prediction)
    matches = []
    for index, answer in enumerate(answers):
        if not isinstance(answer, str):
            raise TypeError(f"answers[{index}] must be a str, got {type(answer).__name__}: {answer!r}")
        matches.append(normalize_vqa_answer(answer) == predicted)
    total = sum(matches)
    # each human left out in turn: the others hold total - (1 if that human matched else 0) matches
    return sum(min(1.0, (total - left_out) / 3) for left_out in matches) / len(matches)


def exact_match(prediction: str, answer: str) -> bool:
    """Whether ``prediction`` and ``answer`` are the same answer after ``normalize_vqa_answer``.

    The VQA normalisation (rather than strip + lower-case alone) so that exact match and VQA
    accuracy agree on what counts as the same answer: "Two." matches "2", "a dog" matches "dog",
    "dont" matches "don't", " Yes" matches "yes"; "3-way" matches "3 way" but not "3way". It is
    stricter than SQuAD's exact match in one way (only the marks in ``PUNCTUATION`` go, so "#5"
    does not match "5") and looser in another (number words). Two answers made of articles only
    both normalise to "" and match. Raises TypeError for a non-str.
    """
    return normalize_vqa_answer(prediction) == normalize_vqa_answer(answer)


# ---------------------------------------------------------------------------------------------
# Multiple choice
# ---------------------------------------------------------------------------------------------

# An option's letter as models write it: "(B)" or "(b)", alone or followed by text; "B" or "B."
# alone; "B." "B)" "B:" followed by text. A bare capital followed by a space and text ("A red
# square") is no label: "A" is also an article. A lead-in "answer:" or "the answer is" (any case)
# may come first, as in LLaVA's ScienceQA outputs.
_LABEL = re.compile(
    r"(?i:(?:the\s+)?answer(?:\s+is)?\s*:?\s*)?"
    r"(?:\((?P<paren>[A-Za-z])\)\s*(?P<paren_text>.*)"
    r"|(?P<marked>[A-Z])[.:)]\s*(?P<marked_text>.*)"
    r"|(?P<alone>[A-Z]))",
    re.DOTALL,
)


def choice_by_generation(generated_text: str, choices: Sequence[str]) -> int | None:
    """The option (0-based index into ``choices``) that ``generated_text`` names, or None.

    A text names option i
    - by its letter (A = 0, B = 1, ...; see ``_LABEL`` for the forms: "(B)", "(b)", "B", "B.",
      "B) blue", "The answer is B."), when i < len(choices); text after the letter must not
      name a different option ("(B) red" with red = option A is ambiguous);
    - or by its text: ``normalize_vqa_answer`` of the whole generation equals that of exactly
      one option ("Blue." names "blue"; "it is blue" names nothing: no substring search).
    None when nothing matches, when two options normalise alike and the text names both, when
    the generation normalises to "" and when the letter and the text point at different options
    (choices ["B", "A"] and the text "B").

    Raises ValueError for no choices, TypeError for non-str text or options.
    """
    if isinstance(choices, str) or len(choices) == 0:
        raise ValueError(f"choices must be a non-empty sequence of option texts, got {choices!r}")
    normalized = [normalize_vqa_answer(choice) for choice in choices]
    by_text = _named_option(normalize_vqa_answer(generated_text), normalized)
    label = _LABEL.fullmatch(generated_text.strip())
    if label is None:
        return by_text
    letter = label["paren"] or label["marked"] or label["alone"]
    index = ord(letter.upper()) - ord("A")
    if index >= len(choices):
        return by_text  # "(E)" among four options is no label; "E" may still be an option's text
    trailing = _named_option(normalize_vqa_answer(label["paren_text"] or label["marked_text"] or ""), normalized)
    if (trailing is not None and trailing != index) or (by_text is not None and by_text != index):
        return None
    return index


def _named_option(normalized_text: str, normalized_choices: Sequence[str]) -> int | None:
    """The one option whose normalised text equals ``normalized_text``; None for none, two or ""."""
    hits = [i for i, choice in enumerate(normalized_choices) if choice == normalized_text]
    return hits[0] if normalized_text and len(hits) == 1 else None


def choice_by_rank(scores: Sequence[float]) -> int:
    """Index of the highest score: rank classification over the options' log-likelihoods.

    ``scores[i]`` is the caller's score of option i given the image and question, higher =
    likelier (InstructBLIP's ScienceQA / IconQA evaluation ranks the candidates by the language
    model's likelihood of each; whether it is summed or averaged over tokens is the caller's).
    Ties go to the lowest index (Python's ``max`` returns the first maximum), so the choice is
    deterministic; -inf is a valid score. Raises ValueError for no scores or a NaN (naming it).
    """
    values = [float(score) for score in scores]
    if not values:
        raise ValueError("choice_by_rank needs at least one score")
    for index, value in enumerate(values):
        if math.isnan(value):
            raise ValueError(f"scores[{index}] is NaN: the option cannot be ranked ({values!r})")
    return max(range(len(values)), key=values.__getitem__)


def multiple_choice_accuracy(predicted_indices: Sequence[int | None], answer_indices: Sequence[int]) -> float:
    """Fraction of questions whose predicted option index equals the answer's, in [0, 1].

    A None prediction (``choice_by_generation`` found no option) counts as wrong. Raises
    ValueError when the sequences differ in length or are empty.
    """
    if len(predicted_indices) != len(answer_indices):
        raise ValueError(
            f"{len(predicted_indices)} predicted indices for {len(answer_indices)} answers: one of each per question"
        )
    if not answer_indices:
        raise ValueError("multiple_choice_accuracy needs at least one question")
    hits = sum(p is not None and p == a for p, a in zip(predicted_indices, answer_indices))
    return hits / len(answer_indices)


# ---------------------------------------------------------------------------------------------
# Captioning: pycocoevalcap's BLEU and CIDEr-D scorers on tokenised captions
# ---------------------------------------------------------------------------------------------

CAPTION_TOKENIZERS = {
    "auto": "ptb when a `java` is on PATH, else python",
    "ptb": (
        "the Stanford PTBTokenizer (CoreNLP 3.4.1, the jar inside pycocoevalcap) run with java, as the COCO "
        "caption evaluation runs it: lower-cased, punctuation tokens dropped"
    ),
    "python": (
        "a pure-Python approximation of ptb, for machines without java: the same lower-casing, clitic "
        'splitting ("don\'t" -> "do n\'t", "dog\'s" -> "dog \'s"), bracket tokens and dropped punctuation'
    ),
}
# what pycocoevalcap's PTBTokenizer passes to the jar (pycocoevalcap/tokenizer/ptbtokenizer.py)
_PTB_COMMAND = ("edu.stanford.nlp.process.PTBTokenizer", "-preserveLines", "-lowerCase")
# every line break str.splitlines knows; the jar breaks lines at \r, \v, \f, \u2028 and \u2029 too,
# which would shift every later caption onto its neighbour's references
_LINE_BREAKS = re.compile("[\n\r\v\f\x1c\x1d\x1e\x85\u2028\u2029]")


@dataclass(frozen=True)
class CaptionScores:
    """Corpus-level captioning scores and how the captions were tokenised.

    bleu4: BLEU-4 in [0, 1]; cider_d: CIDEr-D on the COCO scale (x10, 0 to 10 per image for
    ``images`` > 1); tokenizer: "ptb" or "python", the one that ran (``CAPTION_TOKENIZERS``);
    images: how many captions were scored.
    """

    bleu4: float
    cider_d: float
    tokenizer: str
    images: int


def caption_scores(
    predictions: Mapping[Hashable, str], references: Mapping[Hashable, Sequence[str]], tokenizer: str = "auto"
) -> CaptionScores:
    """BLEU-4 and CIDEr-D of one generated caption per image against that image's references.

    ``predictions``: image id -> generated caption; ``references``: image id -> the human
    captions (at least one); both must hold the same ids. ``tokenizer`` is a key of
    ``CAPTION_TOKENIZERS``; the captions are tokenised once for both scores. See ``bleu4`` and
    ``cider_d`` for the definitions. Raises ValueError / TypeError for mismatched ids or
    malformed captions (naming the id), ImportError naming the extra when pycocoevalcap is
    missing, RuntimeError when java fails.
    """
    res, gts, used = _tokenized(predictions, references, tokenizer)
    bleu = _pycocoevalcap("bleu.bleu").Bleu(4).compute_score(gts, res, verbose=0)[0][3]
    cider = _pycocoevalcap("cider.cider").Cider().compute_score(gts, res)[0]
    return CaptionScores(bleu4=float(bleu), cider_d=float(cider), tokenizer=used, images=len(res))


def bleu4(
    predictions: Mapping[Hashable, str], references: Mapping[Hashable, Sequence[str]], tokenizer: str = "auto"
) -> float:
    """Corpus BLEU-4 (Papineni et al., ACL 2002) as the COCO caption evaluation computes it, in [0, 1].

    pycocoevalcap's ``Bleu(4)``: clipped n-gram counts (each n-gram counted at most as often as
    in the reference holding most of it) summed over the corpus for n = 1..4, precision p_n =
    (matches + 1e-15) / (candidate n-grams + 1e-9); brevity penalty exp(1 - r / c) when the
    candidates' total length c is below r, the sum over images of the reference length closest
    to each candidate's (the shorter on a tie); BLEU-4 = BP * (p_1 p_2 p_3 p_4)^(1/4).

    The two constants make it differ from textbook BLEU in one place: n-grams the corpus lacks
    altogether (every candidate shorter than four tokens) give p_4 = 1e-15 / 1e-9 = 1e-6, not
    0/0, so a corpus of one three-word caption equal to its reference scores (1e-6)^(1/4) =
    0.0316, not 0; a corpus with 4-grams none of which match scores ~1e-4 (about 0).

    Arguments, tokenisation and errors as in ``caption_scores``; the caption-level scores are
    not averaged: this is one corpus-level figure.
    """
    res, gts, _ = _tokenized(predictions, references, tokenizer)
    return float(_pycocoevalcap("bleu.bleu").Bleu(4).compute_score(gts, res, verbose=0)[0][3])


def cider_d(
    predictions: Mapping[Hashable, str], references: Mapping[Hashable, Sequence[str]], tokenizer: str = "auto"
) -> float:
    """CIDEr-D (Vedantam et al., CVPR 2015) as the COCO caption evaluation computes it, mean over images.

    pycocoevalcap's ``Cider`` is CIDEr-D, not plain CIDEr (read in pycocoevalcap 1.2,
    cider/cider_scorer.py): n-grams (n = 1..4) are weighted by tf-idf with the document
    frequency counted over the references of the images being scored; for each n, the
    candidate's vector is compared with each reference's by a cosine in which the candidate's
    weights are clipped to the reference's (``min(vec_hyp, vec_ref) * vec_ref``) and multiplied
    by the Gaussian length penalty exp(-(l_c - l_r)^2 / (2 * 6^2)) (sigma = 6; the lengths are
    the captions' bigram counts, i.e. words - 1); the score of an image is 10 x the mean over
    n and over its references; no stemming.

    The idf is log(images) - log(images whose references hold the n-gram), so the figure
    depends on the whole set: one image alone scores 0 whatever its caption, and an n-gram in
    every image's references weighs nothing. Two images with disjoint vocabularies and each
    candidate equal to its single four-word-or-longer reference score 10 (cosine 1 for every n,
    no length penalty).

    Arguments, tokenisation and errors as in ``caption_scores``.
    """
    res, gts, _ = _tokenized(predictions, references, tokenizer)
    return float(_pycocoevalcap("cider.cider").Cider().compute_score(gts, res)[0])


def tokenize_captions(texts: Sequence[str], tokenizer: str = "auto") -> tuple[list[str], str]:
    """``texts`` tokenised for the caption scorers (tokens joined by spaces) and the tokenizer that ran.

    ``tokenizer``: "ptb" (needs java on PATH; RuntimeError otherwise), "python", or "auto"
    (ptb when ``shutil.which("java")`` finds one, else python); see ``CAPTION_TOKENIZERS``.
    Line breaks inside a caption become spaces first. Raises ValueError for an unknown name.
    """
    if tokenizer not in CAPTION_TOKENIZERS:
        raise ValueError(f"unknown caption tokenizer {tokenizer!r}; choose one of {sorted(CAPTION_TOKENIZERS)}")
    lines = [_LINE_BREAKS.sub(" ", text) for text in texts]
    if tokenizer == "python" or (tokenizer == "auto" and shutil.which("java") is None):
        dropped = frozenset(_pycocoevalcap("tokenizer.ptbtokenizer").PUNCTUATIONS)
        return [_python_ptb(line, dropped) for line in lines], "python"
    return _ptb(lines), "ptb"


def _tokenized(predictions, references, tokenizer: str) -> tuple[dict, dict, str]:
    """(res, gts, tokenizer used): pycocoevalcap's inputs, id -> [tokenised caption(s)], checked first."""
    ids = _checked_ids(predictions, references)
    texts = [predictions[i] for i in ids] + [caption for i in ids for caption in references[i]]
    tokens, used = tokenize_captions(texts, tokenizer)
    res = {i: [tokens[n]] for n, i in enumerate(ids)}
    gts, at = {}, len(ids)
    for i in ids:
        gts[i] = tokens[at : at + len(references[i])]
        at += len(references[i])
    return res, gts, used


def _checked_ids(predictions: Mapping, references: Mapping) -> list:
    """The image ids, in ``references``' order, once both mappings are checked to fit together."""
    missing = [i for i in references if i not in predictions]
    extra = [i for i in predictions if i not in references]
    if missing or extra:
        raise ValueError(
            f"predictions and references must hold the same image ids: {len(missing)} without a prediction "
            f"(first: {missing[:5]!r}), {len(extra)} without references (first: {extra[:5]!r})"
        )
    if not references:
        raise ValueError("no captions to score: predictions and references are empty")
    for i, caption in predictions.items():
        if not isinstance(caption, str):
            raise TypeError(f"prediction for image {i!r}: expected a str, got {type(caption).__name__}: {caption!r}")
    for i, captions in references.items():
        if isinstance(captions, str) or len(captions) == 0:
            raise ValueError(f"references for image {i!r}: expected a non-empty list of str, got {captions!r}")
        for n, caption in enumerate(captions):
            if not isinstance(caption, str):
                raise TypeError(f"references for image {i!r}[{n}]: expected a str, got {type(caption).__name__}")
    return list(references)


def _pycocoevalcap(module: str):
    """``pycocoevalcap.<module>``; ImportError naming the extra that installs it when it is missing."""
    import importlib

    try:
        return importlib.import_module(f"pycocoevalcap.{module}")
    except ImportError as err:
        raise ImportError(
            f"captioning metrics (BLEU-4, CIDEr-D) need pycocoevalcap ({err}): pip install 'qformer-lora[eval]'"
        ) from err


def _ptb(lines: list[str]) -> list[str]:
    """Each line through the Stanford PTBTokenizer jar, as pycocoevalcap's PTBTokenizer.tokenize does.

    Run here rather than through that class because it writes its temporary file into the
    installed package's folder (which fails on a read-only install and races between processes)
    and does not check that a line came back for every caption.
    """
    java = shutil.which("java")
    if java is None:
        raise RuntimeError("the ptb caption tokenizer needs java on PATH; install a JRE or use tokenizer='python'")
    ptb = _pycocoevalcap("tokenizer.ptbtokenizer")
    jar = Path(ptb.__file__).with_name(ptb.STANFORD_CORENLP_3_4_1_JAR)
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "captions.txt"
        path.write_text("\n".join(lines), encoding="utf-8")
        done = subprocess.run([java, "-cp", str(jar), *_PTB_COMMAND, str(path)], capture_output=True, check=False)
    out = done.stdout.decode("utf-8", errors="replace").split("\n")
    if done.returncode != 0 or len(out) < len(lines) or any(line.strip() for line in out[len(lines) :]):
        raise RuntimeError(
            f"the PTBTokenizer ({jar}) failed: exit status {done.returncode}, {len(out)} lines back for "
            f"{len(lines)} captions; its stderr ends: {done.stderr.decode(errors='replace')[-500:]!r}"
        )
    dropped = frozenset(ptb.PUNCTUATIONS)
    return [" ".join(word for word in line.rstrip().split(" ") if word not in dropped) for line in out[: len(lines)]]


# The pure-Python approximation of the PTB tokenizer ("python"): rules read off the jar's output.
# tests/unit/test_metrics.py checks it token for token against the jar on typical captions when
# java is present. Known differences, all rare in captions: URLs and "a:b" (split at the colon
# here), "?!" (one token there), "rock'n'roll", "'tis", "y'all", 6'2" (split there, not here),
# and abbreviations outside the short list below.
_PTB_QUOTES = str.maketrans({"\u2018": "'", "\u2019": "'", "\u201c": '"', "\u201d": '"'})
_PTB_BRACKETS = {"(": "-lrb-", ")": "-rrb-", "[": "-lsb-", "]": "-rsb-", "{": "-lcb-", "}": "-rcb-"}
_PTB_SPACED = (
    (re.compile("[\u2013\u2014]|--+"), " -- "),  # en and em dashes become "--"
    (re.compile(r"\.\.\.+"), " ... "),
    (re.compile('"'), " '' "),
    (re.compile(r"[;!?]|(?<!\d)[,:]|[,:](?!\d)"), r" \g<0> "),  # "1,000" and "10:30" stay whole
)
_PTB_WORDS = {"gonna": "gon na", "gotta": "got ta", "wanna": "wan na", "cannot": "can not", "lemme": "lem me"}
_PTB_CLITICS = ("n't", "'s", "'re", "'ve", "'ll", "'d", "'m")  # split off: "can't" -> "ca n't"
_PTB_ABBREVIATIONS = frozenset("mr. mrs. ms. dr. st. vs. etc. jr. sr. prof. mt. inc. ltd. co. corp. ave.".split())
_PTB_INITIALS = re.compile(r"([a-z]\.)+|[a-z]+(\.[a-z]+)+\.")  # "a." "u.s." "e.g." keep their period


def _python_ptb(line: str, dropped: frozenset) -> str:
    """``line`` tokenised like the PTB jar with -lowerCase, tokens in ``dropped`` removed, joined by spaces."""
    text = line.lower().translate(_PTB_QUOTES)
    for pattern, replacement in _PTB_SPACED:
        text = pattern.sub(replacement, text)
    text = "".join(f" {_PTB_BRACKETS[c]} " if c in _PTB_BRACKETS else c for c in text)
    tokens = [token for chunk in text.split() for token in _ptb_chunk(chunk)]
    return " ".join(token for token in tokens if token not in dropped)


def _ptb_chunk(chunk: str) -> list[str]:
    """One whitespace-separated chunk as PTB tokens: leading $ # ' peeled, then clitics, ' % and final periods."""
    if chunk in _PTB_WORDS:
        return _PTB_WORDS[chunk].split()
    head = []
    while len(chunk) > 1 and chunk[0] in "$#'`" and chunk not in _PTB_CLITICS:
        head.append(chunk[0])
        chunk = chunk[1:]
    tail = []
    while (cut := _ptb_trailing(chunk)) > 0:
        tail.insert(0, chunk[-cut:])
        chunk = chunk[:-cut]
    return head + [chunk] + tail


def _ptb_trailing(chunk: str) -> int:
    """Length of the token to split off the end of ``chunk`` (0: none)."""
    for clitic in _PTB_CLITICS:
        if chunk.endswith(clitic) and len(chunk) > len(clitic):
            return len(clitic)
    if len(chunk) > 1 and chunk[-1] in "'`%":
        return 1
    if len(chunk) > 1 and chunk.endswith(".") and chunk not in _PTB_ABBREVIATIONS:
        return 0 if _PTB_INITIALS.fullmatch(chunk) else 1
    return 0
