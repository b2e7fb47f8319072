"""A byte-level BPE tokenizer trained offline on the captions (HF ``tokenizers``)."""

from __future__ import annotations

from typing import Iterable, List, Sequence

import torch

PAD, BOS, EOS = "<pad>", "<s>", "</s>"


class CaptionTokenizer:
    """Byte-level BPE: lossless round trip for any text, vocabulary learnt from a corpus.

    Nothing is downloaded: ``train`` learns merges from the given texts in memory.
    """

    def __init__(self, tokenizer, context_length: int):
        self._tok = tokenizer
        self.context_length = context_length
        self.pad_id = tokenizer.token_to_id(PAD)
        self.bos_id = tokenizer.token_to_id(BOS)
        self.eos_id = tokenizer.token_to_id(EOS)

    @classmethod  # vocab_size counts the 256 byte symbols and 3 specials, then merges
    def train(cls, texts: Iterable[str], vocab_size: int = 400, context_length: int = 24):
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size, special_tokens=[PAD, BOS, EOS], show_progress=False,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
        tok.train_from_iterator(list(texts), trainer=trainer)
        return cls(tok, context_length)

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size()

    def encode_ids(self, text: str) -> List[int]:
        return self._tok.encode(text).ids

    def decode(self, ids: Sequence[int]) -> str:
        special = {self.pad_id, self.bos_id, self.eos_id}
        return self._tok.decode([i for i in ids if i not in special])

    def __call__(self, texts: Sequence[str]) -> torch.Tensor:
        """(len(texts), context_length) int64 ids: <s> text </s> <pad>...

        Raises ValueError when a text does not fit, rather than truncating it.
        """
        out = torch.full((len(texts), self.context_length), self.pad_id, dtype=torch.int64)
        for row, text in enumerate(texts):
            ids = [self.bos_id, *self.encode_ids(text), self.eos_id]
            if len(ids) > self.context_length:
                raise ValueError(
                    f"text {text!r} needs {len(ids)} tokens, more than context_length="
                    f"{self.context_length}")
            out[row, :len(ids)] = torch.tensor(ids)
        return out
