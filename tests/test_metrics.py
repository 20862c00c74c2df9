"""Metrics against hand-computed values: exact match, VQA accuracy, ANLS, BLEU-4 and CIDEr-D."""

from __future__ import annotations

import math

import pytest

from vlmkit.evaluation.metrics import (
    anls,
    bleu_scores,
    cider_d,
    compute_metric,
    exact_match,
    levenshtein,
    normalize_answer,
    tokenize,
    vqa_accuracy,
    vqa_normalize,
)

# ---------------------------------------------------------------------------------------------- exact match


def test_exact_match_normalisation():
    assert normalize_answer("  Red   Circle. ") == "red circle"
    assert exact_match("Red circle.", ["red circle"]) == 1.0
    assert exact_match("red", ["red circle"]) == 0.0
    assert exact_match("image 2", ["image 1", "Image 2"]) == 1.0  # any reference
    result = compute_metric(
        "exact_match", predictions=["a", "b", "c", "d"], references=[["a"], ["x"], ["c"], ["d"]]
    )
    assert result.score == 0.75 and result.per_sample == [1.0, 0.0, 1.0, 1.0]


# --------------------------------------------------------------------------------------------- VQA accuracy


@pytest.mark.parametrize(
    ("matches", "expected"), [(0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0), (10, 1.0)]
)
def test_vqa_ten_references_leave_one_out(matches, expected):
    # k matching annotators: the k subsets without a match see k-1 matches, the 10-k others see k.
    # k=1: (1*0 + 9*1/3)/10 = 0.3; k=2: (2*1/3 + 8*2/3)/10 = 0.6; k=3: (3*2/3 + 7*1)/10 = 0.9; k=4: 1.0
    references = ["2"] * matches + ["3"] * (10 - matches)
    assert vqa_accuracy("two", references) == pytest.approx(expected)


@pytest.mark.parametrize(
    ("text", "normalised"),
    [
        ("Two", "2"),
        ("a dog", "dog"),
        ("The  Dog", "dog"),
        ("yes.", "yes"),
        ("dont", "don't"),
        ("1,000", "1000"),  # a digit comma: every listed punctuation mark is removed, not spaced
        ("red-ish", "red ish"),  # glued punctuation becomes a space
        ("3.5", "3.5"),  # a period before a digit stays
        ("what?", "what"),
    ],
)
def test_vqa_normalisation(text, normalised):
    assert vqa_normalize(text) == normalised


def test_vqa_fewer_references():
    assert vqa_accuracy("Yes.", ["yes"]) == 1.0  # min(#matches / min(3, #refs), 1)
    assert vqa_accuracy("a dog", ["dog", "cat"]) == pytest.approx(0.5)
    assert vqa_accuracy("dog", ["dog", "dog", "cat"]) == pytest.approx(2 / 3)
    assert vqa_accuracy("dog", ["dog", "dog", "dog", "cat", "cat"]) == 1.0
    assert vqa_accuracy("Two", ["2", "2", "2", "2"]) == 1.0


# ----------------------------------------------------------------------------------------------------- ANLS


def test_levenshtein():
    assert levenshtein("kitten", "sitting") == 3
    assert levenshtein("", "abc") == 3
    assert levenshtein("same", "same") == 0


def test_anls_threshold():
    ref10 = "abcdefghij"
    assert anls("abcdWXYZij", [ref10]) == pytest.approx(0.6)  # 4 edits / 10: distance 0.4 < 0.5
    assert anls("abcdVWXYZj", [ref10]) == 0.0  # 5 edits / 10: distance 0.5 is not below tau
    ref11 = "abcdefghijk"
    assert anls("abcdeVWXYZk", [ref11]) == pytest.approx(1 - 5 / 11)  # similarity 0.545
    assert anls("abcdUVWXYZk", [ref11]) == 0.0  # similarity 5/11 = 0.4545: just below 0.5
    assert anls(" INV-4821 ", ["nothing like it", "inv-4821"]) == 1.0  # case/space-insensitive, max over refs
    assert anls("", [""]) == 1.0


# --------------------------------------------------------------------------------------------------- BLEU-4


def test_tokenize():
    assert tokenize("A red circle, 45.90!") == ["a", "red", "circle", "45.90"]
    assert tokenize("Extract: 2024-12-27.") == ["extract", "2024-12-27"]


def test_bleu4_corpus_by_hand():
    predictions = ["the cat sat on the mat", "a dog runs in the park"]
    references = [["the cat is on the mat"], ["a dog runs in a park"]]
    # clipped matches / candidate n-grams, summed over the corpus:
    #   1-grams: (the x2, cat, on, mat = 5) + (a, dog, runs, in, park = 5) = 10 / 12
    #   2-grams: (the cat, on the, the mat = 3) + (a dog, dog runs, runs in = 3) = 6 / 10
    #   3-grams: (on the mat = 1) + (a dog runs, dog runs in = 2) = 3 / 8
    #   4-grams: 0 + (a dog runs in = 1) = 1 / 6
    # lengths 12 vs 12: no brevity penalty. BLEU-4 = (10/12 * 6/10 * 3/8 * 1/6) ** (1/4) = (1/32) ** (1/4)
    corpus, per_sample = bleu_scores(predictions, references)
    assert corpus[0] == pytest.approx(10 / 12)
    assert corpus[1] == pytest.approx(math.sqrt(0.5))
    assert corpus[3] == pytest.approx(2 ** (-5 / 4))
    assert compute_metric("bleu", predictions=predictions, references=references).score == pytest.approx(
        2**-1.25
    )
    assert len(per_sample) == 2


def test_bleu_brevity_penalty_and_closest_reference():
    # 3 tokens against a 6-token reference: BP = exp(1 - 6/3) = e^-1; BLEU-3 = 1 * BP
    corpus, _ = bleu_scores(["a dog runs"], [["a dog runs in a park"]])
    assert corpus[2] == pytest.approx(math.exp(-1))
    # the closest reference length (2, not 6) is used: no penalty; n-grams are clipped against all refs
    corpus, _ = bleu_scores(["a dog runs"], [["a dog", "a dog runs in a park"]])
    assert corpus[2] == pytest.approx(1.0)


# -------------------------------------------------------------------------------------------------- CIDEr-D


def test_cider_d_by_hand():
    # Two images. df counts images whose references contain the n-gram: "a" is in both, the rest in one.
    # idf = log(2) - log(df): "a" -> 0, everything else -> L = log 2. Length = number of bigrams.
    # image 1: hyp "a cat" -> 1-grams {a: 0, cat: L}, 2-grams {a cat: L}
    #          ref "a cat sat" -> 1-grams {a: 0, cat: L, sat: L} (norm sqrt2 L), 2-grams {a cat, cat sat}: L each
    #          cos1 = L*L / (L * sqrt2 L) = 1/sqrt2, cos2 = 1/sqrt2, cos3 = cos4 = 0 (empty hypothesis vectors)
    #          lengths 1 vs 2: penalty exp(-1 / 72); score = 10 * (2/sqrt2) / 4 * exp(-1/72)
    # image 2: hyp == ref "a dog": cos1 = cos2 = 1, score = 10 * 2 / 4 = 5
    scores = cider_d(["a cat", "a dog"], [["a cat sat"], ["a dog"]])
    first = 10 * (2 / math.sqrt(2)) / 4 * math.exp(-1 / 72)
    assert scores == pytest.approx([first, 5.0])
    result = compute_metric("cider", predictions=["a cat", "a dog"], references=[["a cat sat"], ["a dog"]])
    assert result.score == pytest.approx((first + 5.0) / 2)


def test_cider_d_clipping_and_multiple_references():
    # clipping: hyp "cat cat" has weight 2L on "cat" but the reference only L: cos1 = L*L / (2L * sqrt2 L)
    scores = cider_d(["cat cat", "a dog"], [["a cat sat"], ["a dog"]])
    assert scores[0] == pytest.approx(10 * (1 / (2 * math.sqrt(2))) / 4 * math.exp(-1 / 72))
    # two references are averaged: "a cat" vs "a cat" gives 2 (cos1 + cos2), vs "a cat sat" 2/sqrt2 * penalty
    scores = cider_d(["a cat", "a dog"], [["a cat sat", "a cat"], ["a dog"]])
    assert scores[0] == pytest.approx(10 * (2 + math.sqrt(2) * math.exp(-1 / 72)) / 4 / 2)


def test_compute_metric_errors_and_empty():
    with pytest.raises(ValueError, match="unknown metric"):
        compute_metric("rouge", predictions=["a"], references=[["a"]])
    with pytest.raises(ValueError, match="1 predictions but 2"):
        compute_metric("vqa", predictions=["a"], references=[["a"], ["b"]])
    assert compute_metric("cider", predictions=[], references=[]).score == 0.0
