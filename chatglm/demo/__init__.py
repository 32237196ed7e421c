# The bundled demo model: a tiny ChatGLM3-architecture checkpoint trained by this project (see train.py).
from pathlib import Path

DEMO_MODEL = Path(__file__).parent / "model"


def demo_model_path() -> str:
    if not (DEMO_MODEL / "config.json").exists():
        raise SystemExit(f"the bundled demo model is missing from {DEMO_MODEL}; "
                         "build it with `python -m chatglm.demo.train` or pass a checkpoint folder")
    return str(DEMO_MODEL)
