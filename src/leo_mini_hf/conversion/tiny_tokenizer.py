"""An offline, deterministic byte-level BPE tokenizer for the `tiny` preset (no downloads)."""

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from ..presets import TINY_IMAGE_TOKEN_ID, TINY_VOCAB_SIZE

# Order fixes the ids: pad 0, <|im_start|> 1 (BOS), <|im_end|> 2 (EOS), <|endoftext|> 3, <image> 4.
TINY_SPECIAL_TOKENS = ["<|pad|>", "<|im_start|>", "<|im_end|>", "<|endoftext|>", "<image>"]
IMAGE_TOKEN = "<image>"

_CORPUS = [
    "What is in the image? Describe the picture in detail.",
    "What colour is the shape? The shape is red, green, blue, yellow, black, grey, teal, brown.",
    "What shape is this? It is a circle, a rectangle or a triangle.",
    "Is there a cat in the photo? Yes. No. How many objects are there? One, two, three.",
    "user assistant system You are a helpful assistant.",
    "The quick brown fox jumps over the lazy dog. 0123456789",
]


def build_tiny_tokenizer() -> PreTrainedTokenizerFast:
    """Byte-level BPE trained on a fixed corpus; every byte is encodable, so any text round-trips."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TINY_VOCAB_SIZE,
        special_tokens=TINY_SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_CORPUS * 4, trainer=trainer)
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        pad_token="<|pad|>",
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        unk_token=None,
        extra_special_tokens={"image_token": IMAGE_TOKEN},
        padding_side="left",
    )
    if wrapped.convert_tokens_to_ids(IMAGE_TOKEN) != TINY_IMAGE_TOKEN_ID or len(wrapped) > TINY_VOCAB_SIZE:
        raise RuntimeError("tiny tokenizer ids drifted from the tiny preset")
    return wrapped
