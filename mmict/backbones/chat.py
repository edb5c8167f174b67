"""The query as the model's user turn, rendered by the model's own chat template.

The template renders a user turn whose content items stand for the prompt's segments: an image item per `Image`
(and per `Embeds`, rendered as an image would be: see `mmict.backbones.tokens`), a text item per run of adjacent
`Text` segments (a marker string the template cannot change, put back as the caller's segments afterwards). What
the template writes around the items (LLaVA's "USER: " and "\\n" after "<image>", Qwen's system turn, Idefics'
"User:" with no space before an image) becomes `Text` segments in between, so `assemble` tokenises the exact string
the processor would get from `processor.apply_chat_template`.

Templates that move every image in front of the text (LLaVA-1.5 and LLaVA-NeXT: "Render all images first") would
separate interleaved demonstrations from their images. The prompt's order is kept: each item is followed by what
the template writes after that kind of item (an image by "\\n", a text by LLaVA-1.5's " "), so a prompt whose images
all come first (a zero-shot query, fused demos) renders exactly as the template renders it, and an interleaved one as
the template's items in the prompt's order. The item the template writes last takes no text of its own: what follows
it is the suffix (LLaVA-1.5's " ASSISTANT:").

A target follows the generation prompt, behind the text the template puts between the generation prompt and an
assistant answer (LLaVA's and Idefics' " ": "ASSISTANT: red"), so it is tokenised as the model saw answers in
training. A template that takes no image items (or renders them as something other than the image placeholder)
falls back to one text item holding the whole body between the user turn's affixes.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from typing import Any

from mmict.segments import Embeds, Image, Prompt, Segment, Text

TEXT_MARK = "\x00mmict-text-{}\x00"
USER_MARK = "\x00mmict-user-turn\x00"
ANSWER_MARK = "\x00mmict-answer\x00"


@dataclass(frozen=True)
class ChatLayout:
    """How the template lays out a user turn of given content kinds (see the module doc)."""

    prefix: str  # before the first item (a leading BOS left out: assemble adds it)
    glue: tuple[str, ...]  # after each item, in the prompt's order
    suffix: str  # after the last item: the end of the turn and the generation prompt
    answer_prefix: str  # between the generation prompt and an assistant answer


def render(tokenizer: Any, template: str, user: Any, answer: Any = None) -> str | None:
    """The template's string for one user turn (+ the generation prompt, or an assistant answer); None when the
    template cannot render that content (templates differ in the content forms they accept)."""
    messages = [{"role": "user", "content": user}]
    if answer is not None:
        messages.append({"role": "assistant", "content": answer})
    try:
        return tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False,
                                             add_generation_prompt=answer is None)
    except Exception:  # noqa: BLE001 - a template may raise anything on content it does not take
        return None


def _answer_prefix(tokenizer: Any, template: str, user: Any, rendered: str, as_list: bool) -> str:
    answer = [{"type": "text", "text": ANSWER_MARK}] if as_list else ANSWER_MARK
    full = render(tokenizer, template, user, answer)
    if full is None or not full.startswith(rendered) or ANSWER_MARK not in full[len(rendered):]:
        return ""  # the turn with an answer does not continue the generation prompt: nothing to add
    return full[len(rendered):].split(ANSWER_MARK, 1)[0]


def _without_bos(tokenizer: Any, prefix: str) -> str:
    bos = tokenizer.bos_token
    return prefix[len(bos):] if bos and prefix.startswith(bos) else prefix  # assemble adds BOS itself


def item_layout(tokenizer: Any, template: str, kinds: tuple[str, ...], placeholder: str | None
                ) -> ChatLayout | None:
    """The layout of a user turn whose items are `kinds` ("image" / "text", in the prompt's order), or None when
    the template does not render every item, images as `placeholder`, once each."""
    if not kinds or (placeholder is None and "image" in kinds):
        return None
    marks = [TEXT_MARK.format(i) if kind == "text" else None for i, kind in enumerate(kinds)]
    content = [{"type": "image"} if mark is None else {"type": "text", "text": mark} for mark in marks]
    rendered = render(tokenizer, template, content)
    if rendered is None:
        return None
    tokens = [re.escape(m) for m in marks if m] + ([re.escape(placeholder)] if placeholder else [])
    images = iter(i for i, kind in enumerate(kinds) if kind == "image")
    pieces, order, last = [], [], 0
    for match in re.finditer("|".join(tokens), rendered):
        pieces.append(rendered[last : match.start()])
        order.append(next(images, None) if match.group() == placeholder else marks.index(match.group()))
        last = match.end()
    pieces.append(rendered[last:])
    if sorted(i for i in order if i is not None) != list(range(len(kinds))) or None in order:
        return None
    glue = [""] * len(kinds)
    for j, item in enumerate(order[:-1]):
        glue[item] = pieces[j + 1]
    return ChatLayout(_without_bos(tokenizer, pieces[0]), tuple(glue), pieces[-1],
                      _answer_prefix(tokenizer, template, content, rendered, as_list=True))


def turn_layout(tokenizer: Any, template: str, n_items: int) -> ChatLayout | None:
    """The fallback: the whole body as one text item between the user turn's affixes (list form, else plain)."""
    for as_list in (True, False):
        user = [{"type": "text", "text": USER_MARK}] if as_list else USER_MARK
        rendered = render(tokenizer, template, user)
        if rendered is not None and USER_MARK in rendered:
            prefix, suffix = rendered.split(USER_MARK, 1)
            return ChatLayout(_without_bos(tokenizer, prefix), ("",) * n_items, suffix,
                              _answer_prefix(tokenizer, template, user, rendered, as_list))
    return None


def content_items(body: Prompt) -> list[list[Segment]]:
    """The body as content items: each Image or Embeds alone, each run of adjacent Texts together."""
    items: list[list[Segment]] = []
    for seg in body:
        if isinstance(seg, Text) and items and isinstance(items[-1][-1], Text):
            items[-1].append(seg)
        elif isinstance(seg, (Text, Image, Embeds)):
            items.append([seg])
        else:
            raise TypeError(f"not a segment: {type(seg).__name__} (use Text, Image or Embeds)")
    return items


def kinds_of(items: list[list[Segment]]) -> tuple[str, ...]:
    return tuple("text" if isinstance(item[0], Text) else "image" for item in items)


def wrap(items: list[list[Segment]], targets: list[Text], layout: ChatLayout) -> Prompt:
    """The user turn laid out as `layout` says, then the targets (the first behind the answer prefix)."""
    out: Prompt = [Text(layout.prefix)] if layout.prefix else []
    for item, glue in zip(items, layout.glue):
        out += item
        if glue:
            out.append(Text(glue))
    if layout.suffix:
        out.append(Text(layout.suffix))
    if targets and layout.answer_prefix:
        targets = [replace(targets[0], text=layout.answer_prefix + targets[0].text), *targets[1:]]
    return out + targets
