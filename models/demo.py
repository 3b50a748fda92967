"""Build a tiny random-weight Qwen2 model with a real BPE tokenizer.

Why: no model hub is reachable on CI or on a fresh machine, yet the product and its
integration tests must exercise the real ms-swift engine end to end. A few-MB model
built in about a second gives real tokenization, real `generate`, real usage counts
(its text is gibberish, which the product says loudly).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

#: ms-swift cannot guess these for a local directory, so the demo pins them.
DEMO_MODEL_TYPE = "qwen2"
DEMO_TEMPLATE = "qwen2_5"
DEMO_MARKER = "inferq-demo.json"

_SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
_CORPUS = [
    "You are Qwen, created by Alibaba Cloud. You are a helpful assistant.",
    "system user assistant hello world the quick brown fox jumps over the lazy dog",
    "Say something nice. Tell me a joke. What is two plus two? Write a poem about GPUs.",
    "0 1 2 3 4 5 6 7 8 9 , . ! ? : ; - ( ) [ ] { } ' \" / \\ + = * & % $ # @",
    "abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ",
]


def is_demo_model(path: Path) -> bool:
    return (path / DEMO_MARKER).exists()


#: Model shapes by size name. "0.5b" is Qwen2-0.5B's layer shape (hidden 896, MLP 4864,
#: 14 heads, 2 KV heads) with 32 layers instead of 24: with the demo's 512-token vocab
#: (Qwen2's own is 151,936) that gives 0.48B parameters, about the real model's compute per
#: token. For GPU benchmarks only; tests and `inferq run` use "tiny".
DEMO_SIZES: dict[str, dict[str, Any]] = {
    "tiny": dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        initializer_range=0.4,
    ),
    # compute-bound on a CPU, where "tiny" is overhead-bound (benchmarks only)
    "small": dict(
        hidden_size=512,
        intermediate_size=1024,
        num_hidden_layers=8,
        num_attention_heads=8,
        num_key_value_heads=2,
        initializer_range=0.4,
    ),
    "0.5b": dict(
        hidden_size=896,
        intermediate_size=4864,
        num_hidden_layers=32,
        num_attention_heads=14,
        num_key_value_heads=2,
        initializer_range=0.02,
    ),
}


def build_demo_model(
    path: Path, *, seed: int = 0, vocab_size: int = 512, size: str = "tiny", eos_free: bool = False
) -> Path:
    """Write the model to `path` (idempotent: an existing build is reused).

    `eos_free` zeroes the special tokens' output rows, so greedy decoding never ends a
    request early: benchmarks then compare equal work (every request runs to max_tokens)
    instead of calls whose length depends on when a random model happens to say EOS."""
    if is_demo_model(path) and (path / "config.json").exists():
        return path
    # Heavy imports stay local: the API and the Celery parent import this module's
    # constants without paying for torch.
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    path.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=_SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=["<|im_start|>"],
    )
    fast.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    fast.save_pretrained(path)

    torch.manual_seed(seed)
    config = Qwen2Config(
        vocab_size=len(fast),
        max_position_embeddings=2048,
        eos_token_id=fast.eos_token_id,
        pad_token_id=fast.pad_token_id,
        bos_token_id=None,
        tie_word_embeddings=False,
        **DEMO_SIZES[size],
    )
    model = Qwen2ForCausalLM(config)
    if eos_free:
        with torch.no_grad():
            model.lm_head.weight[fast.convert_tokens_to_ids(_SPECIAL_TOKENS)] = 0.0
    if size != "tiny":
        model = model.bfloat16()  # half the file; the engine picks its dtype
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # a one-shard progress bar for a 1-second write
    model.save_pretrained(path)
    (path / DEMO_MARKER).write_text(
        json.dumps(
            {
                "note": "random weights, gibberish output",
                "size": size,
                "eos_free": eos_free,
                "parameters": model.num_parameters(),
            }
        )
    )
    logger.warning("built the DEMO model (random weights, gibberish output) at %s", path)
    return path
