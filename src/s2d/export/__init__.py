"""Models out of s2d: GGUF files that llama.cpp and transformers' GGUF reader load."""
