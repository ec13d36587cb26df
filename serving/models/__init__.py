"""Llama-family model code and its weight loading from local Hugging Face directories."""
