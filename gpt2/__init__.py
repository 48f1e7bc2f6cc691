"""GPT-2 and its files: the model, checkpoints, llm.c / Hugging Face interop and main.log.

Training and evals both build on this package; it imports neither of them, nor Ray.
"""
