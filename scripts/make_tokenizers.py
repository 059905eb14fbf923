#!/usr/bin/env python3
"""Train the two tiny fixture tokenizers used by the offline test models.

Output (default ``src/qformer_lora/resources/tokenizers/``)::

    lm/        language-model tokenizer (WordLevel, T5 style: "</s>" appended)
    qformer/   Q-Former tokenizer (WordPiece, BERT style: "[CLS] $A [SEP]")
    README.md  the special-token ids, generated so it can never drift

Both are trained with the ``tokenizers`` library on a corpus made of the
shapes fixture's instructions and answers plus a fixed list of common English
words (so ad-hoc generation prompts such as "Question: ... Answer:" tokenize
without <unk>), and saved in the standard transformers layout through
``PreTrainedTokenizerFast(tokenizer_object=...).save_pretrained()``.

Every id is below 500, so tiny model presets can use vocab_size 512 and
image_token_index 511 without colliding with a real token.

Determinism: training on a fixed, ordered corpus is deterministic, and
``tokenizer_config.json`` is rewritten to a fixed, version-independent form
(see ``_canonical_config``). ``--check`` regenerates into a temporary
directory and compares bytes with ``--out``, exiting 1 naming the first
differing file.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

# Same tree comparison as the shapes fixture (scripts/ is on sys.path when run as a script).
from make_shapes import write_or_check
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO_ROOT / "src" / "qformer_lora" / "resources" / "tokenizers"
DEFAULT_SHAPES = REPO_ROOT / "src" / "qformer_lora" / "resources" / "data" / "shapes"

MAX_VOCAB = 500
MODEL_MAX_LENGTH = 512

# Fixed ids: the order of this list IS the id assignment (0, 1, 2, ...).
# "<image>" is reserved up front so that InstructBlipProcessor/Blip2Processor,
# which add an "<image>" token to the LM tokenizer when it lacks one, find it
# already there and do not grow the vocabulary at construction time.
LM_SPECIALS = ["<pad>", "</s>", "<unk>", "<s>", "<image>"]
QFORMER_SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]

# Common English words so that prompts beyond the fixture questions tokenize.
# Kept sorted and fixed: the list is part of the fixture.
EXTRA_WORDS = """
a about above after again all also an and answer any are as at back be because
before behind below best between big black both brief briefly brown but by can
caption colour color colors colours could count describe described detail did
do does down each eight five for four from give good gray green grey has have
he her here how i if image in into is it its left less like little long look
many may me more most much my next nine no not now number object objects of on
one only or orange other out over photo picture pink please purple question
right say says see seven shape shapes she short should show shown six small so
some that the their them then there these they thing things this those three
to top two under up very was we what when where which white who why will with
word would yes you your zero
""".split()
# Digits and punctuation as standalone tokens (the pre-tokenizers split them off).
EXTRA_SYMBOLS = list("0123456789") + list(".,?!:;'\"()-")
# Q-Former WordPiece fallback: any lowercase word/number splits into these.
WORDPIECE_CHARS = list("abcdefghijklmnopqrstuvwxyz0123456789")


def corpus(shapes_dir: Path) -> list[str]:
    """Fixture instructions and answers, then the extra words, in a fixed order."""
    lines: list[str] = []
    for split in ("train", "val"):
        for raw in (shapes_dir / f"{split}.jsonl").read_text(encoding="utf-8").splitlines():
            if raw.strip():
                record = json.loads(raw)
                lines += [record["instruction"], record["answer"]]
    lines += EXTRA_WORDS + EXTRA_SYMBOLS
    return lines


def train_lm(lines: list[str]) -> Tokenizer:
    # WordLevel: one id per lowercase word or punctuation mark. Tiny, readable,
    # and decoding gives back the words exactly (the property tests rely on it).
    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()  # split on whitespace, isolate punctuation
    trainer = trainers.WordLevelTrainer(vocab_size=MAX_VOCAB, min_frequency=1, special_tokens=LM_SPECIALS)
    tok.train_from_iterator(lines, trainer=trainer)
    eos_id = tok.token_to_id("</s>")
    # T5 convention: the tokenizer appends "</s>" to every sequence.
    tok.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B:1 </s>:1", special_tokens=[("</s>", eos_id)]
    )
    return tok


def train_qformer(lines: list[str]) -> Tokenizer:
    # WordPiece like BERT (whose tokenizer real Q-Formers use), so unknown
    # words fall back to character pieces instead of [UNK]. The word list is
    # learned with WordLevelTrainer (deterministic: it breaks count ties by
    # the word itself); tokenizers' WordPieceTrainer is NOT used because it
    # orders tied merges by hash-map iteration and gives different ids on
    # every run. The fallback pieces are a fixed, sorted character set.
    normalizer = normalizers.BertNormalizer(lowercase=True, strip_accents=True, clean_text=True)
    words = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    words.normalizer = normalizer
    words.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    trainer = trainers.WordLevelTrainer(vocab_size=MAX_VOCAB, min_frequency=1, special_tokens=QFORMER_SPECIALS)
    words.train_from_iterator(lines, trainer=trainer)

    vocab = dict(sorted(words.get_vocab().items(), key=lambda item: item[1]))
    for piece in [*WORDPIECE_CHARS, *("##" + c for c in WORDPIECE_CHARS)]:
        vocab.setdefault(piece, len(vocab))

    tok = Tokenizer(models.WordPiece(vocab=vocab, unk_token="[UNK]", continuing_subword_prefix="##"))
    tok.normalizer = normalizer
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    # cleanup=False: the default "cleanup" rewrites e.g. " do not" to " don't" on decode.
    tok.decoder = decoders.WordPiece(cleanup=False)
    cls_id, sep_id = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)],
    )
    return tok


def _check_ids(name: str, tok: Tokenizer, specials: list[str]) -> None:
    for expected_id, token in enumerate(specials):
        got = tok.token_to_id(token)
        if got != expected_id:
            raise SystemExit(f"{name}: special token {token!r} got id {got}, expected {expected_id}")
    size = tok.get_vocab_size()
    if size > MAX_VOCAB:
        raise SystemExit(f"{name}: vocab size {size} exceeds {MAX_VOCAB}")


def _canonical_config(special_tokens: dict[str, str]) -> dict:
    # save_pretrained writes a version-specific tokenizer_config.json (e.g.
    # transformers 5 names the class "TokenizersBackend", which 4.x cannot
    # load). Rewriting it to this fixed form keeps the fixture loadable by
    # AutoTokenizer on both major versions and byte-stable for --check.
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **special_tokens,
        "model_max_length": MODEL_MAX_LENGTH,
        "padding_side": "right",
        "truncation_side": "right",
        "clean_up_tokenization_spaces": False,
    }


def save(tok: Tokenizer, out: Path, special_tokens: dict[str, str]) -> None:
    from transformers import PreTrainedTokenizerFast  # heavy import, only when writing

    out.mkdir(parents=True, exist_ok=True)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, model_max_length=MODEL_MAX_LENGTH, **special_tokens)
    fast.save_pretrained(str(out))
    # Keep only the two files every transformers version reads; the rest
    # (special_tokens_map.json, ...) varies by version and duplicates the config.
    for path in out.iterdir():
        if path.name not in ("tokenizer.json", "tokenizer_config.json"):
            path.unlink()
    config = json.dumps(_canonical_config(special_tokens), indent=2, sort_keys=False) + "\n"
    (out / "tokenizer_config.json").write_text(config, encoding="utf-8")


def readme(lm: Tokenizer, qf: Tokenizer) -> str:
    def table(tok: Tokenizer, specials: list[str]) -> str:
        return "\n".join(f"| `{t}` | {tok.token_to_id(t)} |" for t in specials)

    return f"""# Fixture tokenizers

Generated by `scripts/make_tokenizers.py` (do not edit by hand; run
`python scripts/make_tokenizers.py --check` to verify). Trained on the
instructions/answers of `src/qformer_lora/resources/data/shapes/` plus a fixed list of common
English words. All ids are < 500, so tiny presets may use `vocab_size` 512
and `image_token_index` 511.

## `lm/` — language-model tokenizer

WordLevel, lowercase, whitespace + punctuation pre-tokenizer, vocab size
{lm.get_vocab_size()}. Post-processor appends `</s>` to every sequence (T5 style):
`$A </s>`.

| token | id |
| --- | --- |
{table(lm, LM_SPECIALS)}

`<image>` is reserved so that the BLIP-2/InstructBLIP processors do not add
it (and grow the vocabulary) at construction time; the training harness never
puts it in `input_ids`.

## `qformer/` — Q-Former tokenizer

WordPiece (BERT-like), lowercase, vocab size {qf.get_vocab_size()}. Post-processor:
`[CLS] $A [SEP]`.

| token | id |
| --- | --- |
{table(qf, QFORMER_SPECIALS)}
"""


def generate(out: Path, shapes_dir: Path) -> None:
    lines = corpus(shapes_dir)
    lm, qf = train_lm(lines), train_qformer(lines)
    _check_ids("lm", lm, LM_SPECIALS)
    _check_ids("qformer", qf, QFORMER_SPECIALS)
    save(lm, out / "lm", {"pad_token": "<pad>", "eos_token": "</s>", "unk_token": "<unk>", "bos_token": "<s>"})
    save(
        qf,
        out / "qformer",
        {
            "pad_token": "[PAD]",
            "unk_token": "[UNK]",
            "cls_token": "[CLS]",
            "sep_token": "[SEP]",
            "mask_token": "[MASK]",
        },
    )
    (out / "README.md").write_text(readme(lm, qf), encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output directory (default: %(default)s)")
    parser.add_argument(
        "--shapes", type=Path, default=DEFAULT_SHAPES, help="shapes fixture whose manifests form the corpus"
    )
    parser.add_argument("--check", action="store_true", help="regenerate to a temp dir and compare with --out")
    args = parser.parse_args(argv)

    return write_or_check(
        "make_tokenizers", lambda out: generate(out, args.shapes), args.out, args.check, what="tokenizers"
    )


if __name__ == "__main__":
    sys.exit(main())
