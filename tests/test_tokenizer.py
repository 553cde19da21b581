from vlm_train.data.synthetic import corpus_lines
from vlm_train.data.tokenizer import IMAGE_PAD, build_tiny_tokenizer, special_ids


def test_tiny_tokenizer_encodes_any_text_and_round_trips():
    tokenizer = build_tiny_tokenizer(corpus_lines())
    for text in ["a red circle", "Ünïcödé ✓ 日本語 🙂", "tabs\tand\nnewlines", "(052,310),(480,795)"]:
        ids = tokenizer.encode(text, add_special_tokens=False)
        assert tokenizer.decode(ids) == text


def test_digits_are_single_tokens_so_a_coordinate_is_three_tokens():
    tokenizer = build_tiny_tokenizer(corpus_lines())
    assert len(tokenizer.encode("123", add_special_tokens=False)) == 3
    tokens = tokenizer.convert_ids_to_tokens(tokenizer.encode("(052,310),(480,795)", add_special_tokens=False))
    digit_tokens = [t for t in tokens if any(c.isdigit() for c in t)]
    assert digit_tokens == list("052310480795")


def test_template_words_are_whole_tokens_and_specials_exist():
    tokenizer = build_tiny_tokenizer(corpus_lines())
    assert len(tokenizer.encode("assistant\n", add_special_tokens=False)) <= 2
    ids = special_ids(tokenizer)
    assert tokenizer.convert_ids_to_tokens(ids.image_pad) == IMAGE_PAD
    assert len({ids.pad, ids.im_start, ids.im_end, ids.vision_start, ids.vision_end, ids.image_pad}) == 6


def test_built_tokenizer_is_deterministic_and_saves(tmp_path):
    a, b = build_tiny_tokenizer(corpus_lines()), build_tiny_tokenizer(corpus_lines())
    assert a.get_vocab() == b.get_vocab()
    a.save_pretrained(tmp_path)
    from vlm_train.data.tokenizer import load_tokenizer

    loaded = load_tokenizer(str(tmp_path))
    assert loaded.encode("a blue square and a red circle") == a.encode("a blue square and a red circle")
