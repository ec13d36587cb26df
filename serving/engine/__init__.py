"""The engine: scheduler, sequences, paged KV cache, model runner, sampler, detokenizer."""
