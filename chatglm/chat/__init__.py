# Chat on top of generation: one prompt format per family (formats), the model object users hold (model),
# ChatGLM3 tool calls and tool registries (tools), streamed text with stop strings held back (stream) and the
# tool / code-interpreter loop (agent).
from .formats import CHAT_DEFAULTS, FORMATS, ChatFormat, chat_format, render
from .model import ChatGLM, ModelOutput

__all__ = ["CHAT_DEFAULTS", "FORMATS", "ChatFormat", "ChatGLM", "ModelOutput", "chat_format", "render"]
