"""Enough of a tokenizer for generation tests on the tiny models: ids <-> 'w<id>' words (no special tokens)."""


class WordTokenizer:
    eos_token_id = None
    chat_template = None

    def __call__(self, text):
        return {"input_ids": [int(w[1:]) for w in text.split()]}

    def decode(self, ids, skip_special_tokens=True):
        return " ".join(f"w{int(i)}" for i in ids)
