"""A faithful, self-contained runtime for ChatGLM-6B, ChatGLM2-6B and ChatGLM3-6B checkpoints."""
from .auto import AutoModel, AutoTokenizer
from .chat import ChatGLM

__all__ = ["AutoModel", "AutoTokenizer", "ChatGLM"]
__version__ = "0.1.0"
