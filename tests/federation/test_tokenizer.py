import string

from transformers import AutoTokenizer

from federation.tokenizer import build_char_tokenizer

SPECIALS = ["<pad>", "<s>", "</s>", "<unk>", "<|system|>", "<|user|>", "<|assistant|>"]
CHARS = [c for c in string.printable if c not in "\x0b\x0c\r"]


def test_special_token_ids_and_vocab_layout():
    tokenizer = build_char_tokenizer()
    vocab = tokenizer.get_vocab()
    assert [vocab[token] for token in SPECIALS] == list(range(7))
    assert [vocab[char] for char in CHARS] == list(range(7, 7 + 97))
    assert len(tokenizer) == 104
    assert (tokenizer.pad_token, tokenizer.pad_token_id) == ("<pad>", 0)
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id) == (1, 2, 3)


def test_is_deterministic():
    assert build_char_tokenizer().get_vocab() == build_char_tokenizer().get_vocab()


def test_character_level_encoding_with_single_id_specials():
    tokenizer = build_char_tokenizer()
    vocab = tokenizer.get_vocab()
    ids = tokenizer("<|user|>\na b</s>\r", add_special_tokens=False)["input_ids"]
    assert ids == [5, vocab["\n"], vocab["a"], vocab[" "], vocab["b"], 2, 3]


def test_decode_round_trips_printable_text():
    tokenizer = build_char_tokenizer()
    text = "Hello,  World!\n\tx = [1, 2]; {a: 'b'} ~`"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert len(ids) == len(text)
    assert tokenizer.decode(ids) == text


def test_chat_template_rendering():
    tokenizer = build_char_tokenizer()
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Reverse: lemon"},
        {"role": "assistant", "content": "nomel"},
    ]
    full = tokenizer.apply_chat_template(messages, tokenize=False)
    assert full == "<|system|>\nBe brief.\n<|user|>\nReverse: lemon\n<|assistant|>\nnomel</s>\n"
    prompt = tokenizer.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True)
    assert prompt == "<|system|>\nBe brief.\n<|user|>\nReverse: lemon\n<|assistant|>\n"


def test_save_and_load_round_trip(tmp_path):
    tokenizer = build_char_tokenizer()
    tokenizer.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(str(tmp_path))
    text = "<|user|>\nAdd: 12+30\n<|assistant|>\n42</s>"
    assert loaded(text, add_special_tokens=False)["input_ids"] == tokenizer(text, add_special_tokens=False)["input_ids"]
    assert loaded.get_vocab() == tokenizer.get_vocab()
    assert (loaded.pad_token_id, loaded.bos_token_id, loaded.eos_token_id, loaded.unk_token_id) == (0, 1, 2, 3)
    messages = [{"role": "user", "content": "hi"}]
    assert loaded.chat_template == tokenizer.chat_template
    rendered = loaded.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert rendered == "<|user|>\nhi\n<|assistant|>\n"
