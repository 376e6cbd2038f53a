"""Metrics against hand-computed values."""

from __future__ import annotations

import pytest

from omnikv.errors import ConfigError
from omnikv.eval import metrics as M


def test_string_match():
    assert M.string_match_all("Values: 123 and 456", ["123", "456", "789"]) == pytest.approx(2 / 3)
    assert M.string_match_all("RED and Blue", ["red", "blue"]) == 1.0
    assert M.string_match_part("Values: 123", ["999", "123"]) == 1.0
    assert M.string_match_part("Values: 12", ["999", "123"]) == 0.0


def test_first_int_and_number_match():
    assert M.first_int_match(" 01234. Remember", ["01234"]) == 1.0
    assert M.first_int_match(" 1234 then 01234", ["01234"]) == 0.0
    assert M.first_int_match("no digits", ["1"]) == 0.0
    assert M.first_number_match(" -9222.", ["-9222"]) == 1.0
    assert M.first_number_match(" 3.50 apples", ["3.5"]) == 1.0
    assert M.first_number_match(" 12 or 13", ["13"]) == 0.0
    assert M.exact_match("  yes ", ["yes"]) == 1.0


def test_kv_retrieval_word_match():
    assert M.kv_retrieval('"abc-1".', ["abc-1"]) == 1.0
    assert M.kv_retrieval("abc-12", ["abc-1"]) == 0.0


def test_qa_f1_normalisation():
    assert M.normalize_answer("The  Cat, sat!") == "cat sat"
    # pred {cat, sat} vs ref {cat, sat, down}: P = 1, R = 2/3 -> F1 = 0.8
    assert M.qa_f1("The Cat sat.", ["a cat sat down"]) == pytest.approx(0.8)
    assert M.qa_f1("dog", ["cat", "the dog"]) == 1.0  # max over references
    assert M.qa_f1("", ["cat"]) == 0.0


def test_chinese_f1_and_rouge():
    if M.CHINESE_TOKENIZATION == "characters":
        # 北京大学 vs 北京: 2 common characters; P = 2/4, R = 1 -> 2/3
        assert M.qa_f1_zh("北京大学。", ["北京"]) == pytest.approx(2 / 3)
        # LCS(今天天气很好, 今天很好) = 4 chars: P = 4/6, R = 1 -> 0.8
        assert M.rouge_l_zh("今天天气很好", ["今天很好"]) == pytest.approx(0.8)
    assert M.normalize_zh_answer("你好，世界！ A") == "你好世界a"


def test_rouge_l():
    assert M.lcs_length(list("ABCBDAB"), list("BDCABA")) == 4
    # LCS(the cat sat on the mat, the cat lay on the mat) = 5 of 6 each: F = 5/6
    assert M.rouge_l("The cat sat on the mat.", ["the cat lay on the mat"]) == pytest.approx(5 / 6)
    # P = 2/2, R = 2/4 -> 2/3
    assert M.rouge_l("cat mat", ["the cat on mat"]) == pytest.approx(2 / 3)
    assert M.rouge_l("", ["x"]) == 0.0


def test_classification():
    classes = ["Location", "Entity", "Abbreviation"]
    assert M.classification("Location and Entity", ["Location"], all_classes=classes) == 0.5
    assert M.classification("Abbreviation", ["Location"], all_classes=classes) == 0.0
    # "abc" is a substring of the reference "abcd" but not equal: not counted against it.
    assert M.classification("abcd", ["abcd"], all_classes=["abc", "abcd"]) == 1.0
    with pytest.raises(ConfigError):
        M.classification("x", ["x"])


def test_retrieval_and_count():
    assert M.retrieval("Paragraph 3, not 5, maybe 3", ["Paragraph 3"]) == pytest.approx(2 / 3)
    assert M.retrieval("no number", ["Paragraph 3"]) == 0.0
    assert M.retrieval_zh("段落12", ["段落12"]) == 1.0
    assert M.count("There are 7 or 8", ["7"]) == 0.5


def test_code_sim():
    assert M.first_code_line("\n```python\n# comment\nx = 1\ny = 2") == "x = 1"
    # "x = 1" vs "x = 2": 4 matching characters of 5 + 5 -> 2*4/10
    assert M.code_sim("```\n# c\nx = 1\n", ["x = 2"]) == pytest.approx(0.8)


def test_multiple_choice():
    assert M.extract_choice_longbench_v2("**The correct answer is (B)**") == "B"
    assert M.extract_choice_longbench_v2("The correct answer is C.") == "C"
    assert M.extract_choice_longbench_v2("I think B") is None
    assert M.multiple_choice("The correct answer is (D)", ["D"]) == 1.0
    assert M.multiple_choice("The correct answer is (A)", ["D"]) == 0.0
    assert M.extract_choice_letter(" (C) because") == "C"
    assert M.extract_choice_letter(" A.") == "A"
    assert M.extract_choice_letter("And the") is None
    opts = ["red", "green", "blue", "pink"]
    assert M.choice_letter(" C", ["blue"], options=opts) == 1.0
    assert M.choice_letter(" B", ["blue"], options=opts) == 0.0
    assert M.choice_letter(" it is blue", ["blue"], options=opts) == 1.0


def test_math_calc_and_names():
    assert M.math_calc("[1, 4, 9, 3]", ["1", "4", "8", "3"]) == 0.5
    assert M.math_calc("1 4 8 3 7", ["1", "4", "8", "3"]) == 1.0
    assert M.name_match(" probably ALICE.", ["Alice"]) == 1.0


def test_score_sample_first_line_and_registry():
    assert M.score_sample("qa_f1", "\nparis\nlondon", ["london"], {"first_line_only": True}) == 0.0
    assert M.score_sample("qa_f1", "\nparis\nlondon", ["london"], {}) > 0.0
    assert M.score_sample("classification", "Entity", ["Entity"], {"all_classes": ["Entity", "Location"]}) == 1.0
    with pytest.raises(ConfigError, match="unknown metric"):
        M.score("bleu", "a", ["a"])
