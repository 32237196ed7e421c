# Streaming text: token ids in, text pieces out that never have to be taken back, and that add up to exactly the
# text chat() returns for the same tokens. Used by the CLI and the server.
from __future__ import annotations

from .formats import ChatFormat, chat_format

PLACEHOLDER = "[[训练时间]]"  # the responses replace it, so a tail that may be its start is held back


class HoldBack:
    """Pieces of a growing text that can no longer change. feed(text) takes the whole (processed) text so far
    and returns what is new and settled: the text is cut at the first stop string (then `stopped` is set), a
    tail that may still become a stop string (or the placeholder) is held back, and so are the last
    `unstable` characters and trailing spaces, which post-processing may still change. feed(text, final=True)
    returns the rest. When processing changes text already given out (rare), nothing more is given out until
    the text agrees again."""

    def __init__(self, stops=(), unstable: int = 0):
        self.stops = [s for s in stops if s]
        self.watch = self.stops + [PLACEHOLDER]
        self.unstable = unstable
        self.sent = ""
        self.stopped = False

    def feed(self, text: str, final: bool = False) -> str:
        if self.stopped:
            return ""
        cut = min((i for i in (text.find(s) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            text, final, self.stopped = text[:cut], True, True
        if not final:
            text = text[:max(0, len(text) - max(self.unstable, self._partial_tail(text)))].rstrip()
        if not text.startswith(self.sent):
            return ""
        delta, self.sent = text[len(self.sent):], text
        return delta

    def _partial_tail(self, text: str) -> int:
        """Length of the longest end of text that is the start of a watched string."""
        best = 0
        for s in self.watch:
            for n in range(min(len(s) - 1, len(text)), best, -1):
                if text.endswith(s[:n]):
                    best = n
                    break
        return best


class TextStream:
    """Decodes generated token ids of one answer incrementally and gives out settled text: put(token) -> piece,
    finish() -> the last piece. `result` is then the final answer: chat()'s text for these tokens (the family's
    post-processing: strip, the placeholder, ChatGLM-6B's space and punctuation clean-up), cut at a stop string,
    or a ChatGLM3 tool call {"name", "parameters"} when `tools` are declared (no text is given out for a call).

    format: a ChatFormat (or family); None gives the raw decoded text (completions). prefix: text the answer
    starts with (a forced tool call's metadata line). context: ids before the answer, decoded for their effect
    on the first piece's leading space only."""

    def __init__(self, tokenizer, format: ChatFormat | str | None = None, tools=None, stops=(), prefix: str = "",
                 context=()):
        self.tok = tokenizer
        self.format = chat_format(format) if isinstance(format, str) else format
        self.tools = tools
        # ChatGLM-6B decodes with transformers' space clean-up over the whole text: decode it whole each time
        # (its context is 2048 tokens); the others decode a short window (tokenizer.stream_decoder).
        self.whole = tokenizer.family == "chatglm"
        self.decoder = None if self.whole else tokenizer.stream_decoder()
        self.context = [int(t) for t in context]
        self.ids: list[int] = []
        if self.decoder is not None:
            for t in self.context:
                self.decoder.put(t)
        self.prefix, self.raw = prefix, prefix
        self.hold = HoldBack(stops, unstable=chat_format(tokenizer).unstable_tail)
        self.result: str | dict = ""

    @property
    def stopped(self) -> bool:
        return self.hold.stopped

    @property
    def text(self) -> str:
        """The text given out so far."""
        return self.hold.sent

    def _decode_whole(self) -> str:
        if not self.context:
            return self.prefix + self.tok.decode(self.ids)
        before = self.tok.decode(self.context)
        text = self.tok.decode(self.context + self.ids)
        return self.prefix + (text[len(before):] if text.startswith(before) else self.tok.decode(self.ids))

    def put(self, token: int) -> str:
        self.ids.append(int(token))
        if self.whole:
            self.raw = self._decode_whole()
        else:
            self.raw += self.decoder.put(token)
        if self.format is None:
            return self.hold.feed(self.raw)
        return self.hold.feed(self.format.partial(self.raw, self.tools))

    def finish(self) -> str:
        if not self.whole:
            self.raw += self.decoder.flush()
        result = self.raw if self.format is None else self.format.answer(self.raw, self.tools)
        if not isinstance(result, str):
            self.result = result  # a tool call
            return ""
        delta = self.hold.feed(result, final=True)
        self.result = self.hold.sent
        return delta
