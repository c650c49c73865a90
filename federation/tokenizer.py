"""A character-level tokenizer built locally with `tokenizers` (no download), for the tiny preset models."""

from __future__ import annotations

import string

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

PAD_TOKEN = "<pad>"
BOS_TOKEN = "<s>"
EOS_TOKEN = "</s>"
UNK_TOKEN = "<unk>"
ROLE_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>")
SPECIAL_TOKENS = (PAD_TOKEN, BOS_TOKEN, EOS_TOKEN, UNK_TOKEN, *ROLE_TOKENS)
# Vertical tab, form feed and carriage return carry no meaning in chat data; they map to <unk>.
EXCLUDED_CHARS = "\x0b\x0c\r"
CHARACTERS = tuple(char for char in string.printable if char not in EXCLUDED_CHARS)

# Each message is "<|role|>\n{content}\n"; an assistant turn ends with "</s>" before its newline, so a
# training example (generation prompt + content + eos) is exactly a prefix of the rendered conversation.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] }}"
    "{% if message['role'] == 'assistant' %}{{ '</s>' }}{% endif %}"
    "{{ '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)


def build_char_tokenizer() -> PreTrainedTokenizerFast:
    """One id per character of string.printable (less \\x0b \\x0c \\r) after 7 special tokens; <pad> is id 0."""
    vocab = {token: token_id for token_id, token in enumerate(SPECIAL_TOKENS + CHARACTERS)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK_TOKEN))
    # WordLevel looks up whole pre-tokens, so isolating every character makes it character-level.
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    backend.decoder = decoders.Fuse()
    # Special tokens are matched before pre-tokenization, so "<|user|>" or "</s>" in text is one id.
    backend.add_special_tokens(list(SPECIAL_TOKENS))
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token=PAD_TOKEN,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        unk_token=UNK_TOKEN,
        chat_template=CHAT_TEMPLATE,
        clean_up_tokenization_spaces=False,
    )
