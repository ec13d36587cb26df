"""deltaserve: the server, the engine and the Llama-family model."""
