"""Scorers for every task type, by name.

Each scorer is `score(prediction: str, answers: list[str], **info) -> float` in [0, 1]; reports
multiply by 100. Definitions follow the official scorers (RULER, LongBench, LongBench v2,
InfiniteBench) and are re-implemented here; deviations are noted per function and in
docs/evaluation.md:

- ROUGE-L is implemented here (LCS-based F1 on tokens) instead of depending on `rouge` /
  `rouge-score`: the latter pulls nltk and absl and drops non-Latin characters, so it cannot score
  Chinese at all.
- Chinese word segmentation uses `jieba` when it is installed; otherwise F1 / ROUGE-L are computed
  on characters (`CHINESE_TOKENIZATION` says which was used).
- Code similarity uses `difflib.SequenceMatcher.ratio` instead of fuzzywuzzy's Levenshtein ratio
  (both are 2*matches/total-length ratios; values differ slightly on some strings).
"""

from __future__ import annotations

import difflib
import re
import string
from collections import Counter
from typing import Any, Callable

from omnikv.errors import ConfigError

try:  # optional: official LongBench tokenises Chinese with jieba
    import jieba  # type: ignore[import-not-found]

    CHINESE_TOKENIZATION = "jieba"
except ImportError:  # pragma: no cover - depends on the environment
    jieba = None
    CHINESE_TOKENIZATION = "characters"

Scorer = Callable[..., float]


# ---------------------------------------------------------------- RULER / substring matching


def string_match_all(prediction: str, answers: list[str], **_: Any) -> float:
    """RULER: fraction of the references contained in the prediction (case-insensitive)."""
    if not answers:
        return 0.0
    pred = prediction.lower()
    return sum(a.lower() in pred for a in answers) / len(answers)


def string_match_part(prediction: str, answers: list[str], **_: Any) -> float:
    """RULER QA: 1 if any reference is contained in the prediction (case-insensitive)."""
    pred = prediction.lower()
    return float(any(a.lower() in pred for a in answers))


_INT = re.compile(r"-?\d+")
_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


def first_int_match(prediction: str, answers: list[str], **_: Any) -> float:
    """InfiniteBench passkey / number_string / code_run: the first integer of the output equals a
    reference (digits only; a sign is kept)."""
    found = _INT.search(prediction)
    return float(found is not None and any(found.group() == a.strip() for a in answers))


def first_number_match(prediction: str, answers: list[str], **_: Any) -> float:
    """InfiniteBench math_find: the first number (int or decimal) of the output equals a reference
    numerically."""
    found = _NUMBER.search(prediction)
    if found is None:
        return 0.0
    value = float(found.group())
    for a in answers:
        try:
            if float(a) == value:
                return 1.0
        except ValueError:
            continue
    return 0.0


def exact_match(prediction: str, answers: list[str], **_: Any) -> float:
    """The stripped prediction equals a stripped reference."""
    return float(any(prediction.strip() == a.strip() for a in answers))


def kv_retrieval(prediction: str, answers: list[str], **_: Any) -> float:
    """InfiniteBench kv_retrieval: a reference is one of the output's words, after turning the
    punctuation \\n : " ' . , ? ! { } into spaces."""
    for ch in "\n:\"'.,?!{}":
        prediction = prediction.replace(ch, " ")
    words = set(prediction.split())
    return float(any(a in words for a in answers))


# ---------------------------------------------------------------- LongBench QA F1


def normalize_answer(text: str) -> str:
    """LongBench / SQuAD English normalisation: lowercase, drop punctuation and the articles
    a / an / the, collapse whitespace."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


_ZH_PUNCT = "！？｡。＂＃＄％＆＇（）＊＋，－／：；＜＝＞＠［＼］＾＿｀｛｜｝～｟｠｢｣､、〃》「」『』【】〔〕〖〗〘〙〚〛〜〝〞〟〰〾〿–—‘’‛“”„‟…‧﹏."


def normalize_zh_answer(text: str) -> str:
    """LongBench Chinese normalisation: lowercase, drop ASCII and Chinese punctuation and all
    whitespace."""
    drop = set(string.punctuation + _ZH_PUNCT)
    return "".join(ch for ch in text.lower() if ch not in drop and not ch.isspace())


def _f1(pred_tokens: list[str], ref_tokens: list[str]) -> float:
    common = Counter(pred_tokens) & Counter(ref_tokens)
    same = sum(common.values())
    if same == 0:
        return 0.0
    precision = same / len(pred_tokens)
    recall = same / len(ref_tokens)
    return 2 * precision * recall / (precision + recall)


def qa_f1(prediction: str, answers: list[str], **_: Any) -> float:
    """LongBench qa_f1_score: token F1 after `normalize_answer`, max over references."""
    pred = normalize_answer(prediction).split()
    return max((_f1(pred, normalize_answer(a).split()) for a in answers), default=0.0)


def chinese_tokens(text: str) -> list[str]:
    """Chinese tokens: jieba words if jieba is installed, otherwise single characters; each token
    normalised with `normalize_zh_answer`, empty ones dropped."""
    pieces = list(jieba.cut(text, cut_all=False)) if jieba is not None else list(text)
    return [t for t in (normalize_zh_answer(p) for p in pieces) if t]


def qa_f1_zh(prediction: str, answers: list[str], **_: Any) -> float:
    """LongBench qa_f1_zh_score: F1 over Chinese tokens (see `chinese_tokens`), max over references."""
    pred = chinese_tokens(prediction)
    return max((_f1(pred, chinese_tokens(a)) for a in answers), default=0.0)


# ---------------------------------------------------------------- ROUGE-L


def lcs_length(a: list[str], b: list[str]) -> int:
    """Length of the longest common subsequence (O(len(a) * len(b)) time, O(len(b)) memory)."""
    if not a or not b:
        return 0
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]


def rouge_l_tokens(pred: list[str], ref: list[str]) -> float:
    """ROUGE-L F1 (beta = 1): 2PR / (P + R) with P = LCS/len(pred), R = LCS/len(ref)."""
    lcs = lcs_length(pred, ref)
    if lcs == 0:
        return 0.0
    p, r = lcs / len(pred), lcs / len(ref)
    return 2 * p * r / (p + r)


def _rouge_words(text: str) -> list[str]:
    # Lowercased words and numbers, punctuation dropped (as the `rouge` package's tokeniser does).
    return re.findall(r"[a-z0-9]+", text.lower())


def rouge_l(prediction: str, answers: list[str], **_: Any) -> float:
    """LongBench rouge_score: ROUGE-L F1 on lowercased words, max over references.

    Computed on the whole text (one LCS), not summary-level over sentences."""
    pred = _rouge_words(prediction)
    return max((rouge_l_tokens(pred, _rouge_words(a)) for a in answers), default=0.0)


def rouge_l_zh(prediction: str, answers: list[str], **_: Any) -> float:
    """LongBench rouge_zh_score: ROUGE-L F1 over Chinese tokens (jieba words or characters)."""
    pred = chinese_tokens(prediction)
    return max((rouge_l_tokens(pred, chinese_tokens(a)) for a in answers), default=0.0)


# ---------------------------------------------------------------- LongBench classification / synthetic / code


def classification(prediction: str, answers: list[str], *, all_classes: list[str] | None = None,
                   **_: Any) -> float:
    """LongBench classification_score (trec, lsht): find every class name contained in the output;
    drop matches that are substrings of the reference class but not equal to it; score
    1/len(matches) if the reference is among them, else 0. Max over references."""
    if not all_classes:
        raise ConfigError("classification needs all_classes (the dataset's class names)")
    best = 0.0
    for ref in answers:
        matches = [c for c in all_classes if c in prediction]
        matches = [c for c in matches if not (c in ref and c != ref)]
        if ref in matches:
            best = max(best, 1.0 / len(matches))
    return best


def _fraction_equal(numbers: list[str], target: str) -> float:
    return sum(n == target for n in numbers) / len(numbers) if numbers else 0.0


def retrieval(prediction: str, answers: list[str], **_: Any) -> float:
    """LongBench retrieval_score (passage_retrieval_en): the reference "Paragraph N" gives N; score =
    fraction of the numbers in the output equal to N."""
    best = 0.0
    for ref in answers:
        m = re.findall(r"Paragraph (\d+)", ref)
        if m:
            best = max(best, _fraction_equal(re.findall(r"\d+", prediction), m[0]))
    return best


def retrieval_zh(prediction: str, answers: list[str], **_: Any) -> float:
    """LongBench retrieval_zh_score (passage_retrieval_zh): as `retrieval` with "段落N"."""
    best = 0.0
    for ref in answers:
        m = re.findall(r"段落(\d+)", ref)
        if m:
            best = max(best, _fraction_equal(re.findall(r"\d+", prediction), m[0]))
    return best


def count(prediction: str, answers: list[str], **_: Any) -> float:
    """LongBench count_score (passage_count): fraction of the numbers in the output equal to the
    reference count."""
    numbers = re.findall(r"\d+", prediction)
    return max((_fraction_equal(numbers, str(a).strip()) for a in answers), default=0.0)


def first_code_line(prediction: str) -> str:
    """LongBench code_sim: the first line of the output that is not a comment or a code fence."""
    for line in prediction.lstrip("\n").split("\n"):
        if "`" not in line and "#" not in line and "//" not in line:
            return line
    return ""


def code_sim(prediction: str, answers: list[str], **_: Any) -> float:
    """LongBench code_sim_score (lcc, repobench-p): similarity of the first code line with the
    reference, as `difflib.SequenceMatcher(None, a, b).ratio()` (LongBench: fuzzywuzzy ratio / 100)."""
    line = first_code_line(prediction)
    return max((difflib.SequenceMatcher(None, line, a).ratio() for a in answers), default=0.0)


# ---------------------------------------------------------------- multiple choice


def extract_choice_longbench_v2(prediction: str) -> str | None:
    """LongBench v2: the letter X of "The correct answer is (X)" (or without parentheses), after
    removing markdown asterisks; None if absent."""
    text = prediction.replace("*", "")
    m = re.search(r"The correct answer is \(([A-D])\)", text) or re.search(r"The correct answer is ([A-D])", text)
    return m.group(1) if m else None


def multiple_choice(prediction: str, answers: list[str], **_: Any) -> float:
    """LongBench v2 accuracy: the extracted letter equals the reference letter."""
    choice = extract_choice_longbench_v2(prediction)
    return float(choice is not None and any(choice == a.strip().upper() for a in answers))


def extract_choice_letter(prediction: str) -> str | None:
    """InfiniteBench-style letter extraction for base-model outputs continuing "...answer is":
    the first standalone A-D (optionally in parentheses or followed by '.' / ')')."""
    m = re.search(r"(?<![A-Za-z])\(?([A-D])(?![A-Za-z])", prediction.strip())
    return m.group(1) if m else None


def choice_letter(prediction: str, answers: list[str], *, options: list[str] | None = None,
                  **_: Any) -> float:
    """InfiniteBench longbook_choice_eng / code_debug: correct if the first standalone letter
    A-D names a reference option, or (no letter found) the output contains a reference option's
    text. References may be letters or option texts; `options` maps letters to texts."""
    options = options or []
    ref_letters = set()
    for a in answers:
        a = a.strip()
        if len(a) == 1 and a.upper() in "ABCD":
            ref_letters.add(a.upper())
        elif a in options:
            ref_letters.add("ABCD"[options.index(a)])
    letter = extract_choice_letter(prediction)
    if letter is not None:
        return float(letter in ref_letters)
    return float(any(a.strip() and a.strip() in prediction for a in answers if len(a.strip()) > 1))


def math_calc(prediction: str, answers: list[str], **_: Any) -> float:
    """InfiniteBench math_calc: fraction of the reference sequence of intermediate values reproduced
    before the first error (the output's integers compared in order)."""
    ref = [int(x) for x in answers]
    if not ref:
        return 0.0
    pred = [int(x) for x in _INT.findall(prediction)]
    correct = 0
    for p, r in zip(pred, ref):
        if p != r:
            break
        correct += 1
    return correct / len(ref)


def name_match(prediction: str, answers: list[str], **_: Any) -> float:
    """InfiniteBench longdialogue_qa_eng: a reference name occurs in the output (case-insensitive)."""
    return string_match_part(prediction, answers)


METRICS: dict[str, Scorer] = {
    "string_match_all": string_match_all,
    "string_match_part": string_match_part,
    "first_int_match": first_int_match,
    "first_number_match": first_number_match,
    "exact_match": exact_match,
    "kv_retrieval": kv_retrieval,
    "qa_f1": qa_f1,
    "qa_f1_zh": qa_f1_zh,
    "rouge_l": rouge_l,
    "rouge_l_zh": rouge_l_zh,
    "classification": classification,
    "retrieval": retrieval,
    "retrieval_zh": retrieval_zh,
    "count": count,
    "code_sim": code_sim,
    "multiple_choice": multiple_choice,
    "choice_letter": choice_letter,
    "math_calc": math_calc,
    "name_match": name_match,
}


def get_metric(name: str) -> Scorer:
    if name not in METRICS:
        raise ConfigError(f"unknown metric {name!r}; available: {', '.join(sorted(METRICS))}")
    return METRICS[name]


def score(metric: str, prediction: str, answers: list[str], **info: Any) -> float:
    """Score one prediction with the named metric; `info` carries extras (all_classes, options)."""
    return float(get_metric(metric)(prediction, answers, **info))


def score_sample(metric: str, prediction: str, answers: list[str], metadata: dict[str, Any] | None = None) -> float:
    """Score a sample's prediction with the extras its metadata carries.

    `first_line_only` (LongBench trec / triviaqa / samsum / lsht) scores only the first line of the
    output (after leading newlines); `all_classes` and `options` are passed to the scorer."""
    metadata = metadata or {}
    if metadata.get("first_line_only"):
        prediction = prediction.lstrip("\n").split("\n")[0]
    extras = {k: metadata[k] for k in ("all_classes", "options") if metadata.get(k) is not None}
    return score(metric, prediction, answers, **extras)
