import math
from itertools import combinations

import pytest

from chibichat.common import ChibiError
from chibichat.eval import metrics as M


def test_accuracy_and_centered_hand_values():
    assert M.accuracy([True, False, True, True]) == 0.75
    assert M.accuracy([0.5, 1.0]) == 0.75
    # 4-way MC: chance scores 0, perfect scores 1, always-wrong is -1/3.
    assert M.centered(0.25, 0.25) == 0.0
    assert M.centered(1.0, 0.25) == 1.0
    assert M.centered(0.0, 0.25) == pytest.approx(-1 / 3)
    assert M.centered(0.6, 0.2) == pytest.approx(0.5)
    assert M.centered(0.3, 0.0) == 0.3


def test_bad_inputs_raise():
    with pytest.raises(ChibiError, match="zero items"):
        M.accuracy([])
    with pytest.raises(ChibiError, match="baseline"):
        M.centered(0.5, 1.0)
    with pytest.raises(ChibiError, match="length"):
        M.pearson([1, 2], [1, 2, 3])
    with pytest.raises(ChibiError, match="at least 2"):
        M.spearman([1], [1])
    with pytest.raises(ChibiError, match="gold"):
        M.char_f1("x", [])
    with pytest.raises(ChibiError, match="pass@k"):
        M.pass_at_k(3, 4, 1)


def test_pearson_hand_value():
    # x = 1,2,3 ; y = 1,3,2 : means 2,2; sxy = (-1)(-1)+0+(1)(0) = 1; sxx = syy = 2 -> r = 0.5
    assert M.pearson([1, 2, 3], [1, 3, 2]) == pytest.approx(0.5)
    assert M.pearson([1, 2, 3], [2, 4, 6]) == pytest.approx(1.0)
    assert M.pearson([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    assert math.isnan(M.pearson([1, 1, 1], [1, 2, 3]))


def test_spearman_ties_and_monotone():
    assert M.ranks([10, 20, 20, 5]) == [2.0, 3.5, 3.5, 1.0]
    # monotone but non-linear: Spearman 1, Pearson < 1
    x, y = [1, 2, 3, 4], [1, 4, 9, 100]
    assert M.spearman(x, y) == pytest.approx(1.0)
    assert M.pearson(x, y) < 0.99
    # ranks x = 1,2,3 ; y (with a tie) = 1.5,1.5,3 -> pearson of those
    assert M.spearman([1, 2, 3], [0, 0, 5]) == pytest.approx(M.pearson([1, 2, 3], [1.5, 1.5, 3]))


def test_japanese_normalisation_em_f1():
    # JGLUE's own JSQuAD normalisation: lower-case, trailing "。" stripped, whitespace runs -> one space;
    # no Unicode folding and no punctuation removal.
    assert M.normalize_answer_ja("ＡＢＣ　１２３。") == "ａｂｃ １２３"
    assert M.normalize_answer_ja("  東京\t 都。。") == "東京 都"
    assert M.exact_match("東京都。", ["東京都"]) == 1.0
    assert M.exact_match("「東京都」", ["東京都"]) == 0.0  # brackets are kept
    assert M.exact_match("東京都０１", ["東京都01"]) == 0.0  # full-width digits are not folded
    assert M.exact_match("東京", ["東京都"]) == 0.0
    # pred 東京 (2 chars), gold 東京都 (3 chars): common 2 -> P=1, R=2/3, F1=0.8
    assert M.char_f1("東京", ["東京都"]) == pytest.approx(0.8)
    # the kept space is a character: pred 東,京,' ',都 vs gold 東京都 -> P=3/4, R=1 -> F1=6/7
    assert M.char_f1("東京 都", ["東京都"]) == pytest.approx(6 / 7)
    # max over golds
    assert M.char_f1("東京", ["大阪", "東京都"]) == pytest.approx(0.8)
    assert M.char_f1("京都", ["大阪"]) == 0.0
    # repeated characters count as a multiset: pred ああい, gold あい -> common 2, P=2/3, R=1 -> 0.8
    assert M.char_f1("ああい", ["あい"]) == pytest.approx(0.8)
    assert M.char_f1("", [""]) == 1.0
    # a gold that normalises to "" is dropped; with nothing left the item is scored against ""
    assert M.exact_match("x", ["。"]) == 0.0 and M.exact_match("", ["。"]) == 1.0


def _pass_at_k_bruteforce(n, c, k):
    items = [1] * c + [0] * (n - c)
    subsets = list(combinations(range(n), k))
    return sum(any(items[i] for i in s) for s in subsets) / len(subsets)


@pytest.mark.parametrize("n,c,k", [(5, 0, 1), (5, 1, 1), (5, 2, 3), (8, 3, 4), (6, 6, 2), (4, 1, 4)])
def test_pass_at_k_equals_enumeration(n, c, k):
    assert M.pass_at_k(n, c, k) == pytest.approx(_pass_at_k_bruteforce(n, c, k))
