# Chat on top of generation: one prompt format per family (formats), the model object users hold (model),
# ChatGLM3 tool calls (tools) and streamed text with stop strings held back (stream).
from .model import CHAT_DEFAULTS, ChatGLM, ModelOutput

__all__ = ["CHAT_DEFAULTS", "ChatGLM", "ModelOutput"]
