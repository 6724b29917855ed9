"""LEO-MINI processor: image processor + tokenizer; each image placeholder becomes exactly N_V image tokens."""

from transformers import ProcessorMixin
from transformers.feature_extraction_utils import BatchFeature

from .image_processing_leo_mini import LeoMiniImageProcessor

# ChatML. `{"type": "image"}` blocks render as the placeholder; assistant turns sit inside {% generation %} so
# training can take the loss on answers only (`return_assistant_tokens_mask=True`).
LEO_MINI_CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\n' -}}"
    "{%- if message['role'] == 'assistant' -%}{%- generation -%}"
    "{%- if message['content'] is string -%}{{- message['content'] -}}"
    "{%- else -%}{%- for block in message['content'] -%}"
    "{%- if block['type'] == 'text' -%}{{- block['text'] -}}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{{- '<|im_end|>' -}}{%- endgeneration -%}{{- '\n' -}}"
    "{%- else -%}"
    "{%- if message['content'] is string -%}{{- message['content'] -}}"
    "{%- else -%}{%- for block in message['content'] -%}"
    "{%- if block['type'] == 'image' -%}{{- image_token -}}"
    "{%- elif block['type'] == 'text' -%}{{- block['text'] -}}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{{- '<|im_end|>\n' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\n' -}}{%- endif -%}"
)

TOKENIZER_KWARGS = ("padding", "truncation", "max_length", "add_special_tokens", "padding_side", "pad_to_multiple_of",
                    "return_attention_mask", "return_offsets_mapping", "return_token_type_ids")
IMAGE_KWARGS = ("max_image_pixels", "do_pad", "do_resize", "size", "resample", "do_rescale", "rescale_factor",
                "do_normalize", "image_mean", "image_std")


TEXT_SOURCES = ("prompt", "user")


def conversation_text_blocks(conversation: list[dict]) -> list[tuple[bool, str]]:
    """Every text a chat template renders from `conversation`, in order: (is it the user's, text)."""
    blocks = []
    for message in conversation:
        content = message.get("content")
        texts = [content] if isinstance(content, str) else [
            block.get("text") for block in content or [] if isinstance(block, dict) and block.get("type") == "text"]
        blocks += [(message.get("role") == "user", text) for text in texts if text]
    return blocks


def user_text_spans(text: str, blocks: list[tuple[bool, str]]) -> list[tuple[int, int]]:
    """The character spans of the user's blocks in `text`, a chat template's rendering of `blocks`: each block is found
    after the one before it, so an answer that repeats a question's words is never mistaken for it."""
    spans, cursor = [], 0
    for is_user, block in blocks:
        start = text.find(block, cursor)
        if start == -1:
            raise ValueError(f"cotr_text_source='user' needs a chat template that renders each text block verbatim; "
                             f"{block[:40]!r} is not in the rendered prompt")
        cursor = start + len(block)
        if is_user:
            spans.append((start, cursor))
    return spans


def shift_span(span: tuple[int, int], replacement_offsets: list[dict]) -> tuple[int, int]:
    """A character span of a text → the same characters after its image placeholders were expanded."""
    def shift(position: int) -> int:
        gained = sum(len(r["replacement"]) - len(r["text"]) for r in replacement_offsets if r["span"][1] <= position)
        return position + gained
    return shift(span[0]), shift(span[1])


def check_visual_token_budgets(num_visual_tokens, num_texts: int, budgets: list[int], elastic: bool) -> list[int]:
    """The one check of a visual-token budget: `num_visual_tokens` (an int, or one int per text) → one budget per
    text, each one of `budgets` (an elastic model's `cotr_budgets`, or its fixed N_V), or a clear error."""
    per_text = num_visual_tokens if isinstance(num_visual_tokens, (list, tuple)) else [num_visual_tokens] * num_texts
    if len(per_text) != num_texts:
        raise ValueError(f"num_visual_tokens has {len(per_text)} values for {num_texts} text(s)")
    for budget in per_text:
        if isinstance(budget, bool) or not isinstance(budget, int):
            raise TypeError(f"num_visual_tokens must be an int or a list of ints, got {num_visual_tokens!r}")
        if budget not in budgets:
            kind = "budgets are" if elastic else "fixed N_V is"
            raise ValueError(f"num_visual_tokens={budget} is not one of this model's visual-token budgets: its "
                             f"{kind} {list(budgets)}")
    return list(per_text)


def _is_empty_media(media) -> bool:
    """None or an empty list/tuple, also nested (lmms-eval passes one empty list per sample)."""
    return media is None or (isinstance(media, (list, tuple)) and all(_is_empty_media(item) for item in media))


class LeoMiniProcessor(ProcessorMixin):
    r"""
    Args:
        image_processor (`LeoMiniImageProcessor`), tokenizer (a fast tokenizer holding `image_token` as a special
        token), chat_template (`str`), num_image_tokens (`int`): tokens per image in `input_ids` by default (the
        model's `config.num_image_tokens`: N_V with CoTR); image_token (`str`): the placeholder, default `"<image>"`;
        visual_token_budgets (`list[int]`, optional): an elastic model's `cotr_budgets`, the values
        `num_visual_tokens=k` may take per call (None: only `num_image_tokens`).
        cotr_text_source (`str`, default `"prompt"`): the model's `cotr_text_source`. With `"user"` every call also
        returns `text_condition_mask` (B, T): 1 on the tokens of the user turns' text blocks when the text comes from
        `apply_chat_template`, on every text token when the text is given directly (it is then the user's words).
    """

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, num_image_tokens=64,
                 image_token="<image>", visual_token_budgets=None, cotr_text_source="prompt"):
        self.num_image_tokens = num_image_tokens
        self.image_token = image_token
        self.visual_token_budgets = list(visual_token_budgets) if visual_token_budgets is not None else None
        if cotr_text_source not in TEXT_SOURCES:
            raise ValueError(f"cotr_text_source must be one of {TEXT_SOURCES}, got {cotr_text_source!r}")
        self.cotr_text_source = cotr_text_source
        super().__init__(image_processor, tokenizer, chat_template=chat_template)
        self.image_token_id = tokenizer.convert_tokens_to_ids(image_token)
        if self.image_token_id is None or self.image_token_id == tokenizer.unk_token_id:
            raise ValueError(f"The tokenizer has no token {image_token!r}; add it as a special token first")

    @classmethod
    def from_model_config(cls, config, tokenizer, image_token: str = "<image>") -> "LeoMiniProcessor":
        """The processor matching a `LeoMiniConfig`: its canonical image size and statistics, its tokens per image
        (and an elastic model's budgets), which text conditions CoTR, and the LEO-MINI chat template."""
        image_processor = LeoMiniImageProcessor(size={"height": config.image_size, "width": config.image_size},
                                                image_mean=list(config.image_mean), image_std=list(config.image_std))
        return cls(image_processor=image_processor, tokenizer=tokenizer, chat_template=LEO_MINI_CHAT_TEMPLATE,
                   num_image_tokens=config.num_image_tokens, image_token=image_token,
                   visual_token_budgets=config.cotr_budgets, cotr_text_source=config.cotr_text_source)

    @staticmethod
    def _group_images(images, num_texts: int) -> list[list] | None:
        """None, one image, a flat list, or per-text lists → per-text lists (flat lists are split later)."""
        if images is None:
            return None
        if not isinstance(images, (list, tuple)):
            return [[images]]
        if images and all(isinstance(item, (list, tuple)) for item in images):
            if len(images) != num_texts:
                raise ValueError(f"Got {len(images)} lists of images for {num_texts} text(s)")
            return [list(item) for item in images]
        return [list(images)]

    def __call__(self, images=None, text=None, videos=None, audio=None, return_tensors=None, num_visual_tokens=None,
                 **kwargs) -> BatchFeature:
        """
        text: str or list of str, with one `image_token` per image; images: one image, a list (assigned to the
        placeholders in order), or one list per text. videos / audio (or audios): None or empty, as generic callers
        pass them. num_visual_tokens: an elastic model's budget k for every image, or a list with one k per text
        (each one of `visual_token_budgets`; default `num_image_tokens`). Returns input_ids, attention_mask and, with
        images, pixel_values (n_images, 3, S, S).
        """
        for name, media in (("videos", videos), ("audio", audio), ("audios", kwargs.pop("audios", None))):
            if not _is_empty_media(media):
                raise ValueError(f"LEO-MINI takes images and text only: got non-empty {name}. Pass images=... "
                                 f"(e.g. video frames as images) and leave {name} out, None or empty.")
        if text is None:
            raise ValueError("LeoMiniProcessor needs text (with one image placeholder per image)")
        texts = [text] if isinstance(text, str) else list(text) if isinstance(text, (list, tuple)) else None
        if texts is None or not all(isinstance(t, str) for t in texts):
            raise TypeError(f"text must be a string or a list of strings, got {type(text).__name__}")
        if not texts:
            raise ValueError("text is an empty list: give at least one prompt")
        images_kwargs = dict(kwargs.pop("images_kwargs", None) or {})
        text_kwargs = dict(kwargs.pop("text_kwargs", None) or {})
        for key in list(kwargs):
            if key in IMAGE_KWARGS:
                images_kwargs[key] = kwargs.pop(key)
            elif key in TOKENIZER_KWARGS:
                text_kwargs[key] = kwargs.pop(key)
        kwargs.pop("return_mm_token_type_ids", None)
        max_length = text_kwargs.get("max_length")
        if max_length is not None and (isinstance(max_length, bool) or not isinstance(max_length, int)
                                       or max_length < 1):
            raise ValueError(f"max_length must be a positive int, got {max_length!r}")
        return_replacement_offsets = kwargs.pop("return_text_replacement_offsets", False)
        text_condition_blocks = kwargs.pop("text_condition_blocks", None)  # from apply_chat_template
        if kwargs:
            raise TypeError(
                f"LeoMiniProcessor got unexpected arguments {sorted(kwargs)}; with a pipeline, generation options go "
                "in generate_kwargs={...} (e.g. generate_kwargs={'do_sample': False})"
            )

        budgets = self.budgets_per_text(num_visual_tokens, len(texts))
        placeholders = [t.count(self.image_token) for t in texts]
        grouped = self._group_images(images, len(texts))
        num_images = 0 if grouped is None else sum(len(group) for group in grouped)
        if num_images != sum(placeholders) or (grouped is not None and len(grouped) == len(texts)
                                               and [len(g) for g in grouped] != placeholders):
            raise ValueError(
                f"The text holds {sum(placeholders)} image placeholder(s) {self.image_token!r} "
                f"(per text: {placeholders}) but {num_images} image(s) were given"
            )

        expanded, replacement_offsets = zip(*(self.expand_image_placeholders(t, k) for t, k in zip(texts, budgets)))
        keep_offsets = text_kwargs.get("return_offsets_mapping", False)
        if self.cotr_text_source == "user":
            text_kwargs["return_offsets_mapping"] = True
        encoding = self.tokenizer(list(expanded), **text_kwargs)
        token_counts = [sum(mask) for mask in encoding["attention_mask"]] if "attention_mask" in encoding else [
            len(ids) for ids in encoding["input_ids"]]
        if 0 in token_counts:
            raise ValueError(f"Text {token_counts.index(0)} gives no tokens (an empty prompt): there is nothing to "
                             "answer; give a question, e.g. through apply_chat_template")
        for row, (ids, count, budget) in enumerate(zip(encoding["input_ids"], placeholders, budgets)):
            found = sum(1 for token in ids if token == self.image_token_id)
            if found != count * budget:
                raise ValueError(
                    f"Text {row} should hold {count} x {budget} image tokens after tokenisation but "
                    f"holds {found}: truncation (max_length) cut into an image, or the text contains the image "
                    "token itself. Raise max_length or shorten the text."
                )
        data = dict(encoding)
        if self.cotr_text_source == "user":
            data["text_condition_mask"] = self.text_condition_mask(texts, replacement_offsets, data,
                                                                   text_condition_blocks)
            if not keep_offsets:
                del data["offset_mapping"]
        if return_replacement_offsets:  # lets apply_chat_template map assistant spans onto the expanded text
            data["text_replacement_offsets"] = list(replacement_offsets)
        if num_images:
            flat_images = [image for group in grouped for image in group]
            data.update(self.image_processor(flat_images, return_tensors=None, **images_kwargs))
        return BatchFeature(data=data, tensor_type=return_tensors, skip_tensor_conversion=["text_replacement_offsets"])

    def text_condition_mask(self, texts, replacement_offsets, encoding, text_condition_blocks) -> list[list[int]]:
        """Per text, 1 on each token that overlaps the user's words: the user blocks of `text_condition_blocks` (one
        list per text, from `apply_chat_template`), or the whole text when None. Image, special and padding tokens
        (empty offsets) get 0."""
        if text_condition_blocks is not None and len(text_condition_blocks) != len(texts):
            raise ValueError(f"text_condition_blocks has {len(text_condition_blocks)} entries for {len(texts)} text(s)")
        masks = []
        rows = zip(texts, replacement_offsets, encoding["offset_mapping"], encoding["input_ids"])
        for row, (text, offsets, token_spans, token_ids) in enumerate(rows):
            spans = [(0, len(text))] if text_condition_blocks is None else user_text_spans(
                text, text_condition_blocks[row])
            spans = [shift_span(span, offsets) for span in spans]
            masks.append([int(end > start and token_id != self.image_token_id and any(
                start < span_end and end > span_start for span_start, span_end in spans))
                for (start, end), token_id in zip((tuple(token) for token in token_spans), token_ids)])
        return masks

    def budgets_per_text(self, num_visual_tokens, num_texts: int) -> list[int]:
        """`num_visual_tokens` (None, an int, or one int per text) → the image tokens per image of each text, each
        checked against the model's budgets (`check_visual_token_budgets`)."""
        if num_visual_tokens is None:
            return [self.num_image_tokens] * num_texts
        return check_visual_token_budgets(num_visual_tokens, num_texts, self.visual_token_budgets or
                                          [self.num_image_tokens], elastic=self.visual_token_budgets is not None)

    def expand_image_placeholders(self, text: str, num_visual_tokens: int | None = None) -> tuple[str, list[dict]]:
        """Each placeholder → `num_visual_tokens` (default `num_image_tokens`) image tokens; also returns where each
        one was (char spans)."""
        replacement = self.image_token * (num_visual_tokens or self.num_image_tokens)
        pieces, offsets, position, gained = [], [], 0, 0
        while (start := text.find(self.image_token, position)) != -1:
            end = start + len(self.image_token)
            pieces += [text[position:start], replacement]
            offsets.append({"type": "image", "span": (start, end), "new_span": (start + gained, start + gained +
                            len(replacement)), "text": self.image_token, "replacement": replacement})
            gained += len(replacement) - len(self.image_token)
            position = end
        pieces.append(text[position:])
        return "".join(pieces), offsets

    def apply_chat_template(self, conversation, chat_template=None, **kwargs):
        """As ProcessorMixin's, with this processor's placeholder available to the template as `image_token`; with
        `cotr_text_source="user"` the text blocks go along, so `text_condition_mask` marks the user's words only."""
        kwargs.setdefault("image_token", self.image_token)
        if self.cotr_text_source == "user" and kwargs.get("tokenize"):
            batched = isinstance(conversation, (list, tuple)) and conversation and isinstance(conversation[0],
                                                                                              (list, tuple))
            conversations = conversation if batched else [conversation]
            kwargs["processor_kwargs"] = {**(kwargs.get("processor_kwargs") or {}), "text_condition_blocks": [
                conversation_text_blocks(list(messages)) for messages in conversations]}
        return super().apply_chat_template(conversation, chat_template=chat_template, **kwargs)

    def post_process_image_text_to_text(self, generated_outputs, skip_special_tokens=True, **kwargs):
        """Decode generated ids to text with image tokens removed (also when special tokens are kept)."""
        return self.batch_decode(generated_outputs, skip_special_tokens=skip_special_tokens, **kwargs)

    def batch_decode(self, sequences, skip_special_tokens=True, **kwargs):
        return [self.decode(sequence, skip_special_tokens=skip_special_tokens, **kwargs) for sequence in sequences]

    def decode(self, token_ids, skip_special_tokens=True, **kwargs):
        if hasattr(token_ids, "tolist"):
            token_ids = token_ids.tolist()
        token_ids = [token for token in token_ids if token != self.image_token_id]
        return self.tokenizer.decode(token_ids, skip_special_tokens=skip_special_tokens, **kwargs)

    @property
    def model_input_names(self):
        names = ["input_ids", "attention_mask", "pixel_values"]
        return names + ["text_condition_mask"] if self.cotr_text_source == "user" else names


__all__ = ["LeoMiniProcessor"]
