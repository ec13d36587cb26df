"""HTTP load generator for deltaserve (see the README's roadmap; the server lands with the API issue)."""
