"""Tokenizers for the eval tests (no downloads): the tiny byte-level one and a small trained BPE
whose merges make token counts non-additive, so length fitting is tested for real."""

from __future__ import annotations

import functools


def byte_tokenizer():
    from omnikv.models.tiny import build_tokenizer

    return build_tokenizer()


@functools.lru_cache(maxsize=1)
def bpe_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from tokenizers.processors import TemplateProcessing
    from transformers import PreTrainedTokenizerFast

    from omnikv.eval.tasks.text import narrative_units, pydoc_units

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=800, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=["<s>"])
    tok.train_from_iterator(narrative_units(1500, 1) + pydoc_units(300, 0), trainer=trainer)
    # A BOS on every encode, like Llama/Gemma tokenizers: the fitted length must count it.
    tok.post_processor = TemplateProcessing(single="<s> $A", special_tokens=[("<s>", tok.token_to_id("<s>"))])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>")
