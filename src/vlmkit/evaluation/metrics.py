"""Answer metrics in pure Python: exact match, VQA accuracy, ANLS, BLEU-4 and CIDEr-D.

Every metric takes ``predictions`` (one string each) and ``references`` (a list of strings each) and returns a
``MetricResult``: the corpus score and one score per sample.

- ``exact_match``: 1 if the normalised prediction equals any normalised reference (strip, lowercase, collapse
  whitespace, drop trailing periods).
- ``vqa``: the VQA challenge's answer normalisation (punctuation, digit words -> digits, articles removed,
  contractions), applied to prediction *and* references. With exactly 10 references: the official average over
  the 10 leave-one-out subsets of min(#matches / 3, 1), so 1, 2, 3, >=4 matches give 0.3, 0.6, 0.9, 1.0.
  With any other count: min(#matches / min(3, #refs), 1), so one or two references still allow a full score.
- ``anls``: DocVQA's average normalised Levenshtein similarity, tau = 0.5: per sample the max over references of
  1 - lev(p, r) / max(len(p), len(r)), set to 0 when that distance is >= 0.5 (strings stripped, lowercased,
  whitespace collapsed).
- ``bleu``: corpus BLEU-4 exactly as pycocoevalcap's ``Bleu`` (clipped n-gram counts summed over the corpus,
  geometric mean of 1..4-gram precisions, brevity penalty against the closest reference length, its 1e-15 /
  1e-9 smoothing). Per-sample scores are its per-sentence BLEU-4.
- ``cider``: CIDEr-D exactly as pycocoevalcap's ``Cider`` (n = 4, sigma = 6, tf-idf with document frequencies
  from the references of the evaluated set, clipped hypothesis weights, Gaussian length penalty, averaged over
  references, x10). As there, idf comes from the evaluated corpus: a set of one image scores 0.

BLEU and CIDEr tokenisation (``tokenize``): lowercase, then keep maximal runs of letters/digits; digits joined
by ``. , : - /`` stay one token ("45.90", "2024-12-27"); every other character separates tokens and punctuation
is dropped, as pycocoevalcap's PTB tokenizer drops punctuation tokens. (PTB splits clitics, "it's" -> "it 's";
here the apostrophe separates: "it", "s".)
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass

METRIC_NAMES = ("exact_match", "vqa", "anls", "bleu", "cider")


@dataclass(frozen=True)
class MetricResult:
    score: float
    per_sample: list[float]


def compute_metric(
    name: str, *, predictions: Sequence[str], references: Sequence[Sequence[str]]
) -> MetricResult:
    """Score ``predictions`` against ``references`` with the metric called ``name`` (one of METRIC_NAMES)."""
    if name not in _METRICS:
        raise ValueError(f"unknown metric {name!r}; choose one of {', '.join(METRIC_NAMES)}")
    if len(predictions) != len(references):
        raise ValueError(f"got {len(predictions)} predictions but {len(references)} reference lists")
    if not predictions:
        return MetricResult(score=0.0, per_sample=[])
    return _METRICS[name](predictions, references)


def _averaged(per_sample: Callable[[str, Sequence[str]], float]) -> Callable[..., MetricResult]:
    def metric(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> MetricResult:
        scores = [per_sample(p, refs) for p, refs in zip(predictions, references, strict=True)]
        return MetricResult(score=sum(scores) / len(scores), per_sample=scores)

    return metric


# -------------------------------------------------------------------------------------------- exact match


def normalize_answer(text: str) -> str:
    """strip, lowercase, collapse whitespace, drop trailing periods: "  Red  Circle. " -> "red circle"."""
    return " ".join(text.lower().split()).rstrip(".").rstrip()


def exact_match(prediction: str, references: Sequence[str]) -> float:
    answer = normalize_answer(prediction)
    return float(any(answer == normalize_answer(ref) for ref in references))


# ------------------------------------------------------------------------------------------- VQA accuracy

_CONTRACTIONS_TEXT = """
aint ain't|arent aren't|cant can't|couldve could've|couldnt couldn't|couldn'tve couldn't've|couldnt've couldn't've
didnt didn't|doesnt doesn't|dont don't|hadnt hadn't|hadnt've hadn't've|hadn'tve hadn't've|hasnt hasn't
havent haven't|hed he'd|hed've he'd've|he'dve he'd've|hes he's|howd how'd|howll how'll|hows how's|Id've I'd've
I'dve I'd've|Im I'm|Ive I've|isnt isn't|itd it'd|itd've it'd've|it'dve it'd've|itll it'll|let's let's|maam ma'am
mightnt mightn't|mightnt've mightn't've|mightn'tve mightn't've|mightve might've|mustnt mustn't|mustve must've
neednt needn't|notve not've|oclock o'clock|oughtnt oughtn't|ow's'at 'ow's'at|'ows'at 'ow's'at|'ow'sat 'ow's'at
shant shan't|shed've she'd've|she'dve she'd've|she's she's|shouldve should've|shouldnt shouldn't
shouldnt've shouldn't've|shouldn'tve shouldn't've|somebody'd somebodyd|somebodyd've somebody'd've
somebody'dve somebody'd've|somebodyll somebody'll|somebodys somebody's|someoned someone'd
someoned've someone'd've|someone'dve someone'd've|someonell someone'll|someones someone's
somethingd something'd|somethingd've something'd've|something'dve something'd've|somethingll something'll
thats that's|thered there'd|thered've there'd've|there'dve there'd've|therere there're|theres there's
theyd they'd|theyd've they'd've|they'dve they'd've|theyll they'll|theyre they're|theyve they've|twas 'twas
wasnt wasn't|wed've we'd've|we'dve we'd've|weve we've|werent weren't|whatll what'll|whatre what're|whats what's
whatve what've|whens when's|whered where'd|wheres where's|whereve where've|whod who'd|whod've who'd've
who'dve who'd've|wholl who'll|whos who's|whove who've|whyll why'll|whyre why're|whys why's|wont won't
wouldve would've|wouldnt wouldn't|wouldnt've wouldn't've|wouldn'tve wouldn't've|yall y'all|yall'll y'all'll
y'allll y'all'll|yall'd've y'all'd've|y'alld've y'all'd've|y'all'dve y'all'd've|youd you'd|youd've you'd've
you'dve you'd've|youll you'll|youre you're|youve you've
"""
# the VQA evaluation's table (Cloud-CV/VQA-Challenge vqaEval.py, as used by EvalAI, LLaVA and lmms-eval)
VQA_CONTRACTIONS: dict[str, str] = dict(
    pair.split(" ") for pair in _CONTRACTIONS_TEXT.replace("\n", "|").split("|") if pair
)
VQA_NUMBERS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
               "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}  # fmt: skip
VQA_ARTICLES = frozenset({"a", "an", "the"})
_VQA_PUNCT = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",",
              "?", "!")  # fmt: skip
# the official pattern's "(?!<=\d)" is a typo for a lookbehind and never matches "<=": every period not
# followed by a digit goes ("3.5" keeps its point, "yes." loses it); kept as is for identical scores
_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
_COMMA_STRIP = re.compile(r"(\d)(,)(\d)")


def vqa_normalize(text: str) -> str:
    """The VQA evaluation's answer processing: whitespace, punctuation, then digits/articles/contractions."""
    text = text.replace("\n", " ").replace("\t", " ").strip()
    text = _vqa_punctuation(text)
    words = [VQA_NUMBERS.get(word, word) for word in text.lower().split()]
    words = [VQA_CONTRACTIONS.get(word, word) for word in words if word not in VQA_ARTICLES]
    return " ".join(words)


def _vqa_punctuation(text: str) -> str:
    out = text
    strip_all = _COMMA_STRIP.search(text) is not None  # "1,000": remove, don't space
    for mark in _VQA_PUNCT:
        # glued punctuation ("red-ish") becomes a space, punctuation next to a space disappears
        if strip_all or f"{mark} " in text or f" {mark}" in text:
            out = out.replace(mark, "")
        else:
            out = out.replace(mark, " ")
    return _PERIOD_STRIP.sub("", out)


def vqa_accuracy(prediction: str, references: Sequence[str]) -> float:
    answer = vqa_normalize(prediction)
    refs = [vqa_normalize(ref) for ref in references]
    if not refs:
        return 0.0
    if len(refs) == 10:  # official: average over the 10 leave-one-out sets of 9 annotators
        matches = sum(ref == answer for ref in refs)
        return sum(min(1.0, (matches - (ref == answer)) / 3) for ref in refs) / len(refs)
    return min(1.0, sum(ref == answer for ref in refs) / min(3, len(refs)))


# --------------------------------------------------------------------------------------------------- ANLS

ANLS_TAU = 0.5


def levenshtein(a: str, b: str) -> int:
    """Edit distance (insertions, deletions, substitutions of one character each cost 1)."""
    if len(a) < len(b):
        a, b = b, a
    previous = list(range(len(b) + 1))
    for i, char_a in enumerate(a, start=1):
        current = [i]
        for j, char_b in enumerate(b, start=1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (char_a != char_b)))
        previous = current
    return previous[-1]


def anls(prediction: str, references: Sequence[str], *, tau: float = ANLS_TAU) -> float:
    answer = " ".join(prediction.lower().split())
    best = 0.0
    for ref in references:
        ref = " ".join(ref.lower().split())
        length = max(len(answer), len(ref))
        distance = levenshtein(answer, ref) / length if length else 0.0
        best = max(best, 1.0 - distance if distance < tau else 0.0)
    return best


# ---------------------------------------------------------------------------------------- BLEU and CIDEr-D

_TOKEN = re.compile(r"\d+(?:[.,:/-]\d+)+|[^\W_]+")


def tokenize(text: str) -> list[str]:
    """Lowercase word/number tokens, punctuation dropped: "A red circle, 45.90!" -> [a, red, circle, 45.90]."""
    return _TOKEN.findall(text.lower())


def _ngrams(tokens: list[str], n: int) -> Counter[tuple[str, ...]]:
    return Counter(tuple(tokens[i : i + k]) for k in range(1, n + 1) for i in range(len(tokens) - k + 1))


def bleu_scores(
    predictions: Sequence[str], references: Sequence[Sequence[str]], *, n: int = 4
) -> tuple[list[float], list[list[float]]]:
    """pycocoevalcap Bleu: (corpus BLEU-1..n, per-sentence BLEU-1..n for each sample)."""
    tiny, small = 1e-15, 1e-9  # pycocoevalcap's smoothing constants
    total_guess, total_correct, total_test, total_ref = [0] * n, [0] * n, 0, 0
    per_sample = []
    for prediction, refs in zip(predictions, references, strict=True):
        test = tokenize(prediction)
        ref_tokens = [tokenize(ref) for ref in refs] or [[]]
        max_counts: Counter[tuple[str, ...]] = Counter()
        for tokens in ref_tokens:
            max_counts |= _ngrams(tokens, n)  # | keeps the max count per n-gram
        reflen = min((abs(len(t) - len(test)), len(t)) for t in ref_tokens)[1]  # closest; ties -> shorter
        guess = [max(0, len(test) - k) for k in range(n)]
        correct = [0] * n
        for gram, count in _ngrams(test, n).items():
            correct[len(gram) - 1] += min(max_counts[gram], count)
        per_sample.append(_bleu_from_counts(correct, guess, len(test), reflen, tiny=tiny, small=small))
        total_test, total_ref = total_test + len(test), total_ref + reflen
        total_guess = [a + b for a, b in zip(total_guess, guess, strict=True)]
        total_correct = [a + b for a, b in zip(total_correct, correct, strict=True)]
    corpus = _bleu_from_counts(total_correct, total_guess, total_test, total_ref, tiny=tiny, small=small)
    return corpus, per_sample


def _bleu_from_counts(
    correct: list[int], guess: list[int], testlen: int, reflen: int, *, tiny: float, small: float
) -> list[float]:
    scores, product = [], 1.0
    for k, (c, g) in enumerate(zip(correct, guess, strict=True)):
        product *= (c + tiny) / (g + small)
        scores.append(product ** (1.0 / (k + 1)))
    ratio = (testlen + tiny) / (reflen + small)
    if ratio < 1:  # brevity penalty
        scores = [s * math.exp(1 - 1 / ratio) for s in scores]
    return scores


def _bleu(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> MetricResult:
    corpus, per_sample = bleu_scores(predictions, references)
    return MetricResult(score=corpus[-1], per_sample=[s[-1] for s in per_sample])


def cider_d(
    predictions: Sequence[str], references: Sequence[Sequence[str]], *, n: int = 4, sigma: float = 6.0
) -> list[float]:
    """pycocoevalcap Cider (CIDEr-D): one score per sample; the corpus score is their mean."""
    refs_counts = [[_ngrams(tokenize(ref), n) for ref in refs] for refs in references]
    doc_freq: Counter[tuple[str, ...]] = Counter()
    for counts in refs_counts:
        doc_freq.update({gram for ref in counts for gram in ref})  # an image counts once per n-gram
    log_images = math.log(float(len(references)))
    scores = []
    for prediction, counts in zip(predictions, refs_counts, strict=True):
        vec, norm, length = _tfidf(_ngrams(tokenize(prediction), n), doc_freq, log_images, n)
        total = [0.0] * n
        for ref in counts:
            ref_vec, ref_norm, ref_length = _tfidf(ref, doc_freq, log_images, n)
            penalty = math.exp(-((length - ref_length) ** 2) / (2 * sigma**2))
            for k in range(n):
                # clipping: a hypothesis n-gram weighs at most as much as in the reference
                dot = sum(min(w, ref_vec[k].get(g, 0.0)) * ref_vec[k].get(g, 0.0) for g, w in vec[k].items())
                if norm[k] != 0 and ref_norm[k] != 0:
                    dot /= norm[k] * ref_norm[k]
                total[k] += dot * penalty
        scores.append(sum(total) / n / max(1, len(counts)) * 10.0)
    return scores


def _tfidf(
    counts: Counter[tuple[str, ...]], doc_freq: Counter[tuple[str, ...]], log_images: float, n: int
) -> tuple[list[dict[tuple[str, ...], float]], list[float], int]:
    """tf-idf vectors per n-gram order, their norms, and pycocoevalcap's "length"."""
    vec: list[dict[tuple[str, ...], float]] = [{} for _ in range(n)]
    length = 0
    for gram, tf in counts.items():
        vec[len(gram) - 1][gram] = tf * (log_images - math.log(max(1.0, doc_freq[gram])))
        if len(gram) == 2:  # sic: pycocoevalcap counts bigrams as the length (index n == 1)
            length += tf
    norms = [math.sqrt(sum(w * w for w in order.values())) for order in vec]
    return vec, norms, length


def _cider(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> MetricResult:
    scores = cider_d(predictions, references)
    return MetricResult(score=sum(scores) / len(scores), per_sample=scores)


_METRICS: dict[str, Callable[[Sequence[str], Sequence[Sequence[str]]], MetricResult]] = {
    "exact_match": _averaged(exact_match),
    "vqa": _averaged(vqa_accuracy),
    "anls": _averaged(anls),
    "bleu": _bleu,
    "cider": _cider,
}
