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


# Qwen2-VL's chat template, as its tokenizer_config.json ships it.
QWEN2_VL_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}"
    "<|im_end|>\n{% else %}{% for content in message['content'] %}{% if content['type'] == 'image' or 'image' in "
    "content or 'image_url' in content %}{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}"
    "Picture {{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>{% elif 'text' in content "
    "%}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}{% if add_generation_prompt %}"
    "<|im_start|>assistant\n{% endif %}"
)


def test_a_local_hf_tokenizer_folder_encodes_like_its_qwen2_vl_chat_template(tmp_path):
    from vlm_train.data.encode import Encoder
    from vlm_train.data.formats import Sample, Turn

    from helpers import SPEC, noise_image

    tokenizer = build_tiny_tokenizer(corpus_lines())
    tokenizer.chat_template = QWEN2_VL_TEMPLATE
    tokenizer.save_pretrained(tmp_path)
    from vlm_train.data.tokenizer import load_tokenizer

    loaded = load_tokenizer(str(tmp_path))
    images = [noise_image(112, 56), noise_image(56, 84, 1)]
    turns = [
        Turn("user", "<image>\nWhat is left?"),
        Turn("assistant", "a red circle"),
        Turn("user", "And <image> here?"),
        Turn("assistant", "a blue square"),
    ]
    encoder = Encoder(loaded, SPEC, system_prompt="You are a helpful assistant.")
    encoded = encoder.encode(Sample("k", "s", "conversation", images, turns))

    messages = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "\nWhat is left?"}]},
        {"role": "assistant", "content": "a red circle"},
        {
            "role": "user",
            "content": [{"type": "text", "text": "And "}, {"type": "image"}, {"type": "text", "text": " here?"}],
        },
        {"role": "assistant", "content": "a blue square"},
    ]
    text = loaded.apply_chat_template(messages, tokenize=False)
    pads = [int(g.prod()) // 4 for g in encoded.image_grid_thw]
    first, second, rest = text.split("<|image_pad|>")
    text = first + "<|image_pad|>" * pads[0] + second + "<|image_pad|>" * pads[1] + rest
    assert encoded.input_ids.tolist() == loaded.encode(text, add_special_tokens=False)


def test_a_tokenizer_of_another_family_gets_the_template_tokens(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from vlm_train.data.tokenizer import load_tokenizer

    vocab = {chr(c): i for i, c in enumerate(range(32, 127))} | {"</s>": 95}
    base = Tokenizer(models.WordLevel(vocab, unk_token="</s>"))
    base.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    PreTrainedTokenizerFast(tokenizer_object=base, eos_token="</s>").save_pretrained(tmp_path)
    loaded = load_tokenizer(str(tmp_path))
    ids = special_ids(loaded)
    assert len({ids.pad, ids.im_start, ids.im_end, ids.vision_start, ids.vision_end, ids.image_pad}) == 6
    assert min(ids.pad, ids.image_pad) >= 96 and len(loaded) == 102
    assert loaded.encode("<|im_start|>ab", add_special_tokens=False) == [ids.im_start, vocab["a"], vocab["b"]]
